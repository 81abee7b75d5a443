"""The Delta Lake tables: one schema per table (tables), the embedding column's format (embedding_column), writing, replacing, deleting and reading partitions (lake), compaction, checkpoints and vacuum (maintenance).

May import storage, imaging and quality. Keep this file free of imports: importing a light domain must not pull in torch or pyarrow.
"""
