"""Dagster wiring: partitions, resources, assets and jobs. Behaviour lives in imgemb_assets.core."""
