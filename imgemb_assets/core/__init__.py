"""Pure compute: images, embeddings, storage and Delta tables. Never imports Dagster."""
