"""The Python API behind `imgemb similar`, at the path the README gives: `similar_to_id`, `similar_to_photo`,
`similar_to_text` (a CLIP's text tower, answered from its model's index), and `similar_to_vector` for a query
vector of a model (each takes `where=` to filter on the sales columns).

The code lives in the search domain (`core/search/similar.py`); this module only names it for users.
"""

from imgemb_assets.core.search.similar import (
    SimilarError,
    similar_to_id,
    similar_to_photo,
    similar_to_text,
    similar_to_vector,
)

__all__ = ["SimilarError", "similar_to_id", "similar_to_photo", "similar_to_text", "similar_to_vector"]
