"""The embedding wiring: image_embeddings, its step on each prefix, and the embedding_model resource.
Imports `names`, `location` and the core."""
