"""The search wiring: the search index and near_duplicates, their job and the similarity resource.
Imports `names`, `location` and the core."""
