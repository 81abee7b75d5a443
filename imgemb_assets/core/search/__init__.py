"""Search over the vectors: one index per model, in memory and saved under the lake root (the index package: a module per part), keeping indexes and near_duplicates in step with the embedding table (refresh), near-duplicate pairs and their check (near_duplicates), the `imgemb similar` queries (similar) and their `--where` filter on the sales columns (sales_filter).

May import every domain below it: storage, imaging, quality, lake, ingest, sales, embedding. Keep this file free of imports: importing a light domain must not pull in torch or pyarrow.
"""
