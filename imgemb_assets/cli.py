"""Project commands for operators: `imgemb discover`, `imgemb status` and `imgemb backfill-missing --asset NAME`.

Both read the same IMGEMB_* (and AWS) variables as the code location, and
DAGSTER_HOME for the instance that holds the partitions.

    imgemb discover                              register every prefix as an s3_prefix partition
    imgemb status [--asset image_embeddings]     each table's prefixes that are missing or stale
                                                 (written before their upstream last changed)
    imgemb backfill-missing [--asset image_embeddings] [--dry-run] [--no-discover] [--in-process | --submit]
                                                 register new prefixes (as discover does), then
                                                 materialize what the asset lacks, `sales` included
                                                 when it is missing or its files changed: with a
                                                 daemon running, as one asset backfill it executes;
                                                 without one, here, one run at a time
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from dagster import DagsterInstance

from imgemb_assets.core import tables
from imgemb_assets.core.s3 import S3Settings
from imgemb_assets.core.storage import open_object_store, partition_key_problem
from imgemb_assets.defs.partitions import S3_PREFIX_PARTITIONS_NAME
from imgemb_assets.defs.settings import LocationSettings

if TYPE_CHECKING:
    from imgemb_assets.defs.backfills import BackfillPlan, RunOutcome

# Each command is a process of its own in the user's path: it imports only what it uses
# (the assets and their libraries only where runs are planned or executed).
PARTITIONED_ASSETS = tuple(name for name in tables.ALL_TABLES if name != tables.SALES)


class CommandError(Exception):
    """A problem the operator can fix; printed without a traceback."""


def required_env(name: str, environ: Mapping[str, str]) -> str:
    value = environ.get(name)
    if not value:
        raise CommandError(f"{name} is not set")
    return value


def discover(instance: DagsterInstance, raw_images_uri: str, register: bool = True) -> tuple[list[str], list[str]]:
    """Registers every prefix under the root (or only finds the new ones); (new, all prefixes)."""
    # The standard AWS variables, as the location's `s3` resource reads them by default.
    store = open_object_store(raw_images_uri, S3Settings())
    listing = store.list_partition_folders()
    prefixes = listing.prefixes
    known = list(instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME))
    registered = set(known)
    added = [prefix for prefix in prefixes if prefix not in registered]
    if added and register:
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, added)
    # Refused names are reported, never registered: one of them must not stop the others.
    for name, reason in sorted(listing.refused.items()):
        print(f"warning: prefix {name!r} is not registered and its objects are in no partition: {reason}", file=sys.stderr)
    for key in known:
        if (problem := partition_key_problem(key)) is not None:
            print(f"warning: registered partition {key!r} is no valid prefix ({problem}); delete it in the UI", file=sys.stderr)
    for name in store.list_root_files():
        print(f"warning: {name} lies directly under the root and belongs to no partition", file=sys.stderr)
    return added, prefixes


def _discover_command(args: argparse.Namespace) -> int:
    with DagsterInstance.get() as instance:
        _discover_and_report(instance)
    return 0


def _discover_and_report(instance: DagsterInstance, register: bool = True) -> None:
    added, prefixes = discover(instance, required_env("IMGEMB_RAW_IMAGES_URI", os.environ), register)
    print(f"{len(prefixes)} prefixes; {'registered' if register else 'would register'} {len(added)} new: {added}")


def _backfill_missing_command(args: argparse.Namespace) -> int:
    from imgemb_assets.definitions import defs as location_definitions
    from imgemb_assets.defs.backfills import (
        daemon_is_running,
        plan_backfill,
        refresh_sales_in_process,
        run_in_process,
        submit_asset_backfill,
    )

    settings = LocationSettings.from_environ(os.environ)
    sales_store = open_object_store(required_env("IMGEMB_SALES_URI", os.environ), S3Settings())
    with DagsterInstance.get() as instance:
        if not args.no_discover:
            # A prefix that was never registered is missing too; a dry run changes nothing.
            _discover_and_report(instance, register=not args.dry_run)
        plan = plan_backfill(instance, args.asset, sales_store)
        _print_plan(plan, args.asset)
        if plan.empty or args.dry_run:
            return 0
        submit = args.submit or (not args.in_process and daemon_is_running(instance))
        defs = location_definitions()
        if submit:
            if plan.refresh_sales and not _print_outcome(refresh_sales_in_process(instance, defs)):
                return 1
            if not plan.tables_by_prefix:
                return 0
            backfill_id = submit_asset_backfill(instance, defs, plan)
            print(
                f"submitted asset backfill {backfill_id}: the daemon runs it in runs of at most "
                f"{settings.max_partitions_per_run} prefixes, through the instance's run queue"
            )
            return 0
        print(f"no daemon is running: materializing here, one run at a time, at most {settings.max_partitions_per_run} prefixes per run")
        outcomes = [_print_outcome(outcome) for outcome in run_in_process(instance, defs, plan, settings.max_partitions_per_run)]
    return 0 if all(outcomes) else 1


def _status_command(args: argparse.Namespace) -> int:
    from imgemb_assets.defs.backfills import chain_up_to, not_current_by_step

    shown = 20
    with DagsterInstance.get() as instance:
        registered = list(instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME))
        print(f"{len(registered)} registered prefixes")
        for status in not_current_by_step(instance, chain_up_to(args.asset), registered):
            current = len(registered) - len(status.not_current)
            print(f"{status.asset}: {current} current, {len(status.missing)} missing, {len(status.stale)} stale")
            for prefix in status.missing[:shown]:
                print(f"  missing {prefix!r}")
            for prefix, upstream in list(status.stale.items())[:shown]:
                print(f"  stale   {prefix!r}: {', '.join(upstream)} changed after it was written")
            if len(status.missing) > shown or len(status.stale) > shown:
                print(f"  ... (the first {shown} of each)")
    return 0


def _print_outcome(outcome: RunOutcome) -> bool:
    chunk = outcome.chunk
    what = "sales" if chunk is None else f"{len(chunk.prefixes)} prefixes {chunk.prefixes[0]} .. {chunk.prefixes[-1]}"
    what = f"sales and {what}" if outcome.with_sales else what
    print(f"run {outcome.run_id}: {what}: {'succeeded' if outcome.success else 'FAILED'}", flush=True)
    return outcome.success


def _print_plan(plan: BackfillPlan, asset: str) -> None:
    if plan.refresh_sales:
        print(f"sales: materialized first ({plan.sales_reason})")
    if plan.skipped_in_progress:
        print(f"{len(plan.skipped_in_progress)} prefixes left to a backfill in progress")
    for key, problem in plan.skipped_invalid.items():
        print(f"registered partition {key!r} skipped: {problem}")
    if not plan.tables_by_prefix:
        print(f"every registered partition of {asset} is materialized; nothing to launch")
        return
    print(f"{len(plan.tables_by_prefix)} prefixes need {asset}: {plan.prefixes[:20]}{' ...' if len(plan.prefixes) > 20 else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgemb", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("discover", help="register every prefix of the raw-images root as a partition")
    backfill = commands.add_parser("backfill-missing", help="backfill the partitions an asset lacks")
    backfill.add_argument("--asset", choices=PARTITIONED_ASSETS, default=tables.IMAGE_EMBEDDINGS)
    backfill.add_argument("--dry-run", action="store_true", help="print what would be launched")
    backfill.add_argument(
        "--no-discover", action="store_true", help="only registered prefixes (by default new prefixes are registered first)"
    )
    how = backfill.add_mutually_exclusive_group()
    how.add_argument("--in-process", action="store_true", help="materialize here even if a daemon is running")
    how.add_argument("--submit", action="store_true", help="submit an asset backfill even if no daemon is running")
    status = commands.add_parser(
        "status", help="each table's prefixes that are missing or stale (written before their upstream changed)"
    )
    status.add_argument("--asset", choices=PARTITIONED_ASSETS, default=tables.IMAGE_EMBEDDINGS)
    args = parser.parse_args(argv)
    if "DAGSTER_HOME" not in os.environ:
        print("error: DAGSTER_HOME is not set (the instance that holds the partitions)", file=sys.stderr)
        return 2
    try:
        handlers = {"discover": _discover_command, "backfill-missing": _backfill_missing_command, "status": _status_command}
        return handlers[args.command](args)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
