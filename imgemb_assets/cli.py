"""Project commands for operators: `imgemb discover` and `imgemb backfill-missing --asset NAME`.

Both read the same IMGEMB_* (and AWS) variables as the code location, and
DAGSTER_HOME for the instance that holds the partitions.

    imgemb discover                              register every prefix as an s3_prefix partition
    imgemb backfill-missing --asset image_embeddings [--dry-run]
                                                 launch `dagster job backfill` for the partitions
                                                 that have no materialization of that asset
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from dagster import AssetKey, DagsterInstance

from imgemb_assets.core import tables
from imgemb_assets.core.storage import open_object_store
from imgemb_assets.defs.jobs import PREFIX_JOB_NAME
from imgemb_assets.defs.partitions import S3_PREFIX_PARTITIONS_NAME
from imgemb_assets.defs.resources import ImgembS3Resource

PARTITIONED_ASSETS = tuple(name for name in tables.ALL_TABLES if name != tables.SALES)


class CommandError(Exception):
    """A problem the operator can fix; printed without a traceback."""


def required_env(name: str, environ: Mapping[str, str]) -> str:
    value = environ.get(name)
    if not value:
        raise CommandError(f"{name} is not set")
    return value


def discover(instance: DagsterInstance, raw_images_uri: str) -> tuple[list[str], list[str]]:
    """Registers every prefix under the root; (newly added, all prefixes)."""
    store = open_object_store(raw_images_uri, ImgembS3Resource().settings())
    prefixes = store.list_prefixes()
    known = set(instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME))
    added = [prefix for prefix in prefixes if prefix not in known]
    if added:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, added)
    for name in store.list_root_files():
        print(f"warning: {name} lies directly under the root and belongs to no partition", file=sys.stderr)
    return added, prefixes


def missing_partitions(instance: DagsterInstance, asset: str) -> list[str]:
    """Registered partitions with no materialization of `asset`, in order."""
    registered = instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME)
    materialized = instance.get_materialized_partitions(AssetKey(asset))
    return sorted(prefix for prefix in registered if prefix not in materialized)


def backfill_command(partitions: Sequence[str]) -> list[str]:
    dagster = str(Path(sys.executable).with_name("dagster"))
    return [
        dagster, "job", "backfill", "-m", "imgemb_assets.definitions", "-j", PREFIX_JOB_NAME,
        "--partitions", ",".join(partitions), "--noprompt",
    ]  # fmt: skip


def _discover_command(args: argparse.Namespace) -> int:
    with DagsterInstance.get() as instance:
        added, prefixes = discover(instance, required_env("IMGEMB_RAW_IMAGES_URI", os.environ))
    print(f"{len(prefixes)} prefixes; registered {len(added)} new: {added}")
    return 0


def _backfill_missing_command(args: argparse.Namespace) -> int:
    with DagsterInstance.get() as instance:
        missing = missing_partitions(instance, args.asset)
    if not missing:
        print(f"every registered partition of {args.asset} is materialized; nothing to launch")
        return 0
    # `dagster job backfill --partitions` splits on commas.
    unlaunchable = [prefix for prefix in missing if "," in prefix]
    for prefix in unlaunchable:
        print(
            f"cannot pass {prefix!r} to dagster job backfill (it holds a comma); run: "
            f"dagster asset materialize -m imgemb_assets.definitions --select '*' --partition '{prefix}'",
            file=sys.stderr,
        )
    launchable = [prefix for prefix in missing if prefix not in unlaunchable]
    command = backfill_command(launchable)
    print(f"missing {args.asset} for {len(missing)} partitions; launching {PREFIX_JOB_NAME} for: {launchable}")
    print("$ " + " ".join(command))
    if args.dry_run or not launchable:
        return 1 if unlaunchable else 0
    done = subprocess.run(command, check=False)
    return done.returncode or (1 if unlaunchable else 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgemb", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("discover", help="register every prefix of the raw-images root as a partition")
    backfill = commands.add_parser("backfill-missing", help="backfill the partitions an asset lacks")
    backfill.add_argument("--asset", choices=PARTITIONED_ASSETS, default=tables.IMAGE_EMBEDDINGS)
    backfill.add_argument("--dry-run", action="store_true", help="print what would be launched")
    args = parser.parse_args(argv)
    if "DAGSTER_HOME" not in os.environ:
        print("error: DAGSTER_HOME is not set (the instance that holds the partitions)", file=sys.stderr)
        return 2
    try:
        return _discover_command(args) if args.command == "discover" else _backfill_missing_command(args)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
