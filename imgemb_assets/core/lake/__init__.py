"""The Delta Lake tables: one schema per table (tables), the embedding column's format (embedding_column), writing, replacing, deleting and reading partitions (lake), what a prefix becomes in a table and the SQL that selects it (partition_values), the old and new physical layouts (partition_layout), commits retried against concurrent writers and their preconditions (commits), the data files of a streamed write (data_files), what writes and reads refuse with (errors), compaction, checkpoints and vacuum (maintenance), the `migrate` command (__main__).

May import storage, imaging and quality. Keep this file free of imports: importing a light domain must not pull in torch or pyarrow.
"""
