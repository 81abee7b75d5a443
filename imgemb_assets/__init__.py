"""imgemb: a Dagster code location that turns product photos and sales into image embeddings on Delta Lake."""
