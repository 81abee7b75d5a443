"""From a bucket to partitions and thumbnails: the partition scheme (partition_scheme, partitioned_root, scheme_record), what a sensor tick lists and reports (discovery, notifications), a partition's manifest rows (manifest) and its thumbnail and rejected rows (thumbnails).

May import storage, imaging, quality and lake. Keep this file free of imports: importing a light domain must not pull in torch or pyarrow.
"""
