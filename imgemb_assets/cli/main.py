"""Project commands for operators: `imgemb discover`, `imgemb status`, `imgemb backfill-missing --asset NAME` and `imgemb similar`.

They read the same IMGEMB_* (and AWS) variables as the code location, and
DAGSTER_HOME for the instance that holds the partitions (`similar` reads the lake only).

    imgemb discover                              register every partition of the root (IMGEMB_PARTITION_SCHEME
                                                 cuts it) as an s3_prefix partition, and report those whose
                                                 objects changed
    imgemb status [--asset image_embeddings]     each table's prefixes that are missing or stale
                                                 (written before their upstream last changed)
    imgemb backfill-missing [--asset image_embeddings] [--dry-run] [--no-discover] [--in-process | --submit]
                                                 register new prefixes (as discover does), then
                                                 materialize what the asset lacks, `sales` included
                                                 when it is missing or its files changed: with a
                                                 daemon running, as one asset backfill it executes;
                                                 without one, here, one run at a time
    imgemb similar IMAGE_ID [--k 10] [--prefix P] [--sales-weight W] [--where EXPR]
    imgemb similar --image PATH_OR_S3_URI [--weights WEIGHTS] [--model M] [--device D] [--k 10] [--sales-weight W] [--where EXPR]
    imgemb similar --text TEXT [--weights WEIGHTS] [--model M] [--device D] [--k 10] [--sales-weight W] [--where EXPR]
                                                 the images most like one in the lake, like a new photo
                                                 (embedded with --weights, default IMGEMB_MODEL_WEIGHTS,
                                                 by --model, default IMGEMB_MODEL), or matching a text
                                                 (encoded by the text tower of those weights' CLIP,
                                                 --model default clip_vit_b_32; open_clip_dir for a
                                                 checkpoint folder), from the index the
                                                 refresh_search_index job keeps for that model; with a
                                                 sales weight, similar best-sellers first; with --where,
                                                 only images whose images_with_sales row matches EXPR
                                                 (one SQL boolean expression, e.g.
                                                 "price < 50 AND category = 'shoes'")
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

import dagster as dg

from imgemb_assets.cli.common import CommandError, lake_of, required_env
from imgemb_assets.cli.similar import similar_command
from imgemb_assets.core.embedding.backbones.specs import BACKBONES
from imgemb_assets.core.ingest.partition_scheme import PartitionScheme
from imgemb_assets.core.ingest.partitioned_root import PartitionedRoot
from imgemb_assets.core.ingest.scheme_record import SchemeMismatchError, require_scheme
from imgemb_assets.core.lake import tables
from imgemb_assets.core.storage.names import partition_key_problem
from imgemb_assets.core.storage.open_store import open_object_store
from imgemb_assets.core.storage.s3 import S3ConfigError, S3Settings
from imgemb_assets.dagster_wiring.location.partitions import register_prefixes
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import S3_PREFIX_PARTITIONS_NAME

if TYPE_CHECKING:
    from imgemb_assets.dagster_wiring.backfills import BackfillPlan, RunOutcome

# Each command is a process of its own in the user's path: it imports only what it uses
# (the assets and their libraries only where runs are planned or executed).
PARTITIONED_ASSETS = tuple(name for name in tables.ALL_TABLES if name != tables.SALES)
# The commands that read or change the Dagster instance (and so need DAGSTER_HOME).
_INSTANCE_COMMANDS = frozenset({"discover", "backfill-missing", "status"})


def discover(
    instance: dg.DagsterInstance, raw_images_uri: str, register: bool = True, environ: Mapping[str, str] | None = None
) -> tuple[list[str], list[str]]:
    """Registers every partition of the root (or only finds the new ones) and reports the changed ones; (new, all).

    Every partition folder is listed (the sensor lists only new and recent ones): a partition whose
    objects changed since its last report or manifest is reported as a new `raw_images`
    materialization, as the sensor does, so `imgemb backfill-missing` (and automation) see it stale.
    """
    from imgemb_assets.core.ingest.discovery import plan_discovery
    from imgemb_assets.dagster_wiring.ingest.discovery_sensor import (
        known_prefixes,
        report_changed_listings,
        uncovered_objects_line,
    )

    environ = os.environ if environ is None else environ
    scheme = PartitionScheme.parse(LocationSettings.from_environ(environ).partition_scheme)
    lake_uri = environ.get("IMGEMB_LAKE_URI")
    if lake_uri and register:
        try:
            require_scheme(lake_of(lake_uri), scheme)
        except SchemeMismatchError as exc:
            raise CommandError(str(exc)) from exc
    # The standard AWS variables, as the location's `s3` resource reads them by default.
    root = PartitionedRoot(open_object_store(raw_images_uri, S3Settings()), scheme)
    known = list(instance.get_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME))
    plan = plan_discovery(root, known_prefixes(instance, known), recent=0, full=True)
    added = register_prefixes(instance, plan.new_prefixes, register)
    if register:
        report_changed_listings(instance, plan.changed)
    # Refused names are reported, never registered: one of them must not stop the others.
    for name, reason in sorted(plan.refused_prefixes.items()):
        print(
            f"warning: prefix {name!r} is not registered and its objects are in no partition: {reason}", file=sys.stderr
        )
    for prefix, error in sorted(plan.listing_errors.items()):
        print(f"warning: {prefix!r} could not be listed: {error}", file=sys.stderr)
    for key in known:
        if (problem := partition_key_problem(key)) is not None:
            print(
                f"warning: registered partition {key!r} is no valid prefix ({problem}); delete it in the UI",
                file=sys.stderr,
            )
        elif not scheme.is_partition_key(key):
            print(
                f"warning: registered partition {key!r} is no partition of the scheme {str(scheme)!r}", file=sys.stderr
            )
    if plan.root_objects:
        print(f"warning: {uncovered_objects_line(plan.root_objects)}", file=sys.stderr)
    changed_known = sorted(set(plan.changed) - set(plan.new_prefixes))
    if changed_known:
        print(f"{len(changed_known)} partitions changed since they were last read: {changed_known[:20]}")
    return added, plan.listed_prefixes


def _discover_command(args: argparse.Namespace) -> int:
    with dg.DagsterInstance.get() as instance:
        _discover_and_report(instance)
    return 0


def _discover_and_report(instance: dg.DagsterInstance, register: bool = True) -> None:
    added, prefixes = discover(instance, required_env("IMGEMB_RAW_IMAGES_URI", os.environ), register)
    print(f"{len(prefixes)} partitions; {'registered' if register else 'would register'} {len(added)} new: {added}")


def _backfill_missing_command(args: argparse.Namespace) -> int:
    from imgemb_assets.dagster_wiring.backfills import (
        daemon_is_running,
        plan_backfill,
        refresh_sales_in_process,
        run_in_process,
        submit_asset_backfill,
    )
    from imgemb_assets.definitions import defs as location_definitions

    settings = LocationSettings.from_environ(os.environ)
    sales_store = open_object_store(required_env("IMGEMB_SALES_URI", os.environ), S3Settings())
    with dg.DagsterInstance.get() as instance:
        if not args.no_discover:
            # A prefix that was never registered is missing too; a dry run changes nothing.
            _discover_and_report(instance, register=not args.dry_run)
        submit = args.submit or (not args.in_process and daemon_is_running(instance))
        plan = plan_backfill(instance, args.asset, sales_store, skip_unfinished_runs=submit)
        _print_plan(plan, args.asset)
        if plan.empty or args.dry_run:
            return 0
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
        print(
            f"no daemon is running: materializing here, one run at a time, at most {settings.max_partitions_per_run} prefixes per run"
        )
        outcomes = [
            _print_outcome(outcome) for outcome in run_in_process(instance, defs, plan, settings.max_partitions_per_run)
        ]
    return 0 if all(outcomes) else 1


def _status_command(args: argparse.Namespace) -> int:
    from imgemb_assets.dagster_wiring.backfills import chain_up_to, not_current_by_step

    shown = 20
    with dg.DagsterInstance.get() as instance:
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
        print(f"{len(plan.skipped_in_progress)} prefixes left to a backfill or run in progress")
    for key, problem in plan.skipped_invalid.items():
        print(f"registered partition {key!r} skipped: {problem}")
    if not plan.tables_by_prefix:
        print(f"every registered partition of {asset} is materialized; nothing to launch")
        return
    print(
        f"{len(plan.tables_by_prefix)} prefixes need {asset}: {plan.prefixes[:20]}{' ...' if len(plan.prefixes) > 20 else ''}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgemb", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("discover", help="register every prefix of the raw-images root as a partition")
    backfill = commands.add_parser("backfill-missing", help="backfill the partitions an asset lacks")
    backfill.add_argument("--asset", choices=PARTITIONED_ASSETS, default=tables.IMAGE_EMBEDDINGS)
    backfill.add_argument("--dry-run", action="store_true", help="print what would be launched")
    backfill.add_argument(
        "--no-discover",
        action="store_true",
        help="only registered prefixes (by default new prefixes are registered first)",
    )
    how = backfill.add_mutually_exclusive_group()
    how.add_argument("--in-process", action="store_true", help="materialize here even if a daemon is running")
    how.add_argument("--submit", action="store_true", help="submit an asset backfill even if no daemon is running")
    status = commands.add_parser(
        "status", help="each table's prefixes that are missing or stale (written before their upstream changed)"
    )
    status.add_argument("--asset", choices=PARTITIONED_ASSETS, default=tables.IMAGE_EMBEDDINGS)
    similar = commands.add_parser(
        "similar",
        help="the images most like one in the lake (IMAGE_ID), like a new photo (--image) or matching a text (--text)",
    )
    similar.add_argument("image_id", nargs="?", metavar="IMAGE_ID", help="an image_id of image_embeddings")
    similar.add_argument("--image", metavar="PATH_OR_S3_URI", help="a photo, embedded with the query model")
    similar.add_argument(
        "--text", metavar="TEXT", help='a text, e.g. "red running shoes", encoded by the query CLIP\'s text tower'
    )
    similar.add_argument(
        "--weights",
        metavar="WEIGHTS",
        help="the query model's weights (--image, --text), as IMGEMB_MODEL_WEIGHTS takes them; default "
        "IMGEMB_MODEL_WEIGHTS: they must be those the indexed images were embedded with",
    )
    similar.add_argument(
        "--model",
        metavar="MODEL",
        help=f"the query model's backbone ({', '.join(BACKBONES)}); default open_clip_dir when the weights are a "
        "folder, else IMGEMB_MODEL (default resnet50), and clip_vit_b_32 for --text when that has no text tower",
    )
    similar.add_argument("--device", help="where the query model runs: auto (default), cpu, cuda or cuda:N")
    similar.add_argument("--k", type=int, default=10, help="how many images (default 10)")
    similar.add_argument("--prefix", help="the prefix of IMAGE_ID, when it is in several")
    similar.add_argument(
        "--sales-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="0..1: weight of the sales percentile against similarity (default 0: by similarity only)",
    )
    similar.add_argument(
        "--where",
        metavar="EXPR",
        help="only images whose images_with_sales row matches EXPR, one SQL boolean expression over image_id, "
        "prefix and the sales columns, e.g. \"price < 50 AND category = 'shoes'\" (comparisons, AND/OR/NOT, IN, "
        "LIKE, BETWEEN, IS NULL; no aggregates, window functions or subqueries)",
    )
    args = parser.parse_args(argv)
    if args.command in _INSTANCE_COMMANDS and "DAGSTER_HOME" not in os.environ:
        print("error: DAGSTER_HOME is not set (the instance that holds the partitions)", file=sys.stderr)
        return 2
    try:
        handlers = {
            "discover": _discover_command,
            "backfill-missing": _backfill_missing_command,
            "status": _status_command,
            "similar": similar_command,
        }
        return handlers[args.command](args)
    except (CommandError, S3ConfigError) as exc:  # a refusal to fix by hand: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
