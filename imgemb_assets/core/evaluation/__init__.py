"""How well a model's vectors separate the labels: silhouette, kNN agreement, similarity distribution (scores).

May import every domain below it: storage, imaging, quality, lake, ingest, sales, embedding. Keep this file free of imports: importing a light domain must not pull in torch or pyarrow.
"""
