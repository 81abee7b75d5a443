"""The ingest wiring: raw_images, raw_image_manifest, downscaled_images and rejected_images; the discovery
sensor, the runs it launches, the rolling reconciliation, vanished prefixes; the jobs of a prefix's chain.
Imports `names`, `location` and the core."""
