"""`python -m imgemb_assets.core.lake migrate <lake uri> [table ...]`: the command the README gives, today's partition
layout for tables created partitioned by `prefix`."""

from __future__ import annotations

import argparse
import sys

from imgemb_assets.core.lake import tables
from imgemb_assets.core.lake.lake import Lake
from imgemb_assets.core.lake.tables import PARTITION_STORAGE_COLUMN
from imgemb_assets.core.storage.s3 import S3Settings


def main(argv: list[str] | None = None) -> int:
    """`python -m imgemb_assets.core.lake migrate <lake uri> [table ...]`: today's partition layout for old tables."""
    parser = argparse.ArgumentParser(prog="python -m imgemb_assets.core.lake", description=main.__doc__)
    parser.add_argument("command", choices=["migrate"])
    parser.add_argument("lake_uri")
    parser.add_argument("tables", nargs="*", help="default: every partitioned table of the pipeline")
    args = parser.parse_args(argv)
    options = S3Settings().delta_storage_options() if args.lake_uri.startswith("s3://") else None
    lake = Lake(args.lake_uri, storage_options=options)
    names = args.tables or [name for name in tables.ALL_TABLES if name != tables.SALES]
    for name in names:
        if not lake.exists(name):
            print(f"{name}: no table")
        else:
            migrated = lake.migrate_partitioning(name)
            print(f"{name}: {'migrated' if migrated else 'already partitioned by ' + PARTITION_STORAGE_COLUMN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
