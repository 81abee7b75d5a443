"""The evaluation wiring: embedding_evaluation. Imports `names`, `location`, `embedding` and `search` (their resources) and the core."""
