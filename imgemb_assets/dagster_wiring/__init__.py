"""Dagster wiring, cut by the same domains as `imgemb_assets.core`; behaviour lives in the core.

- `names.py`: every asset key, check, job, sensor, pool, tag and metadata key the wiring shares.
- `location/`: what every domain uses: settings, partitions, one step over many partitions,
  retries, automation conditions, the executor and GPU placement, the shared resources.
- `ingest/`: raw_images, raw_image_manifest, downscaled_images and rejected_images; discovery,
  reconciliation and vanished prefixes; the jobs of a prefix's whole chain.
- `sales/`: sales_export, sales and images_with_sales; the sales sensor and jobs.
- `embedding/`: image_embeddings, its step and the embedding_model resource.
- `evaluation/`: embedding_evaluation.
- `search/`: the search index and near_duplicates, their job and the similarity resource.
- `lake/`: lake maintenance, its job and schedule.
- `backfills.py`: what `imgemb backfill-missing` plans and runs, across the domains.

Each domain's `definitions.py` builds its `Definitions`; `imgemb_assets.definitions` merges them.
A domain imports only `names`, `location` and the domains before it in this list.
"""
