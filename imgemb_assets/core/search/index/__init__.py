"""The similar-image search index over one model's vectors: the index in memory (search_index), its exact search (exact) and its HNSW graph (graph), the partitions it takes and holds (partitions), its errors (errors); under the lake root, saving and loading it (persistence), its parquet segments (segments), its manifest with retired files and orphans (manifest), the indexes stored there (stored); and the numbers an asset reports about it (metrics).

Keep this file free of imports: importing the package must not pull in usearch or pyarrow.
"""
