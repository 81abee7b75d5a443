"""Objects under a local or s3:// root and how they are reached: S3 settings and clients (s3), listing and reading objects (objects), pyarrow filesystems configured like delta-rs (arrow_filesystem), compare-and-swap of one small file (conditional_write).

Imports no other domain: it is the floor. Keep this file free of imports: importing a light domain must not pull in torch or pyarrow.
"""
