"""Objects under a local or s3:// root and how they are reached: S3 settings and clients (s3), what an object store offers, lists and refuses with (objects), names, keys and URIs of objects (names), the stores of a local folder (local_store) and of an s3:// prefix (s3_store), the store a root URI names (open_store), pyarrow filesystems configured like delta-rs (arrow_filesystem), compare-and-swap of one small file (conditional_write).

Imports no other domain: it is the floor. Keep this file free of imports: importing a light domain must not pull in torch or pyarrow.
"""
