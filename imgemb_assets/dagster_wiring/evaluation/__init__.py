"""The evaluation wiring: embedding_evaluation. Imports `names`, `location`, `search` (its resource) and the core."""
