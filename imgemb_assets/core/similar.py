"""The Python API behind `imgemb similar`, at the path the README gives: `similar_to_id`, `similar_to_photo`.

The code lives in the search domain (`core/search/similar.py`); this module only names it for users.
"""

from imgemb_assets.core.search.similar import SimilarError, similar_to_id, similar_to_photo

__all__ = ["SimilarError", "similar_to_id", "similar_to_photo"]
