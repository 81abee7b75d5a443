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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dagster import DagsterInstance

from imgemb_assets.core.embedding.backbones.specs import BACKBONES, has_text_tower
from imgemb_assets.core.ingest.partition_scheme import PartitionScheme
from imgemb_assets.core.ingest.partitioned_root import PartitionedRoot
from imgemb_assets.core.ingest.scheme_record import SchemeMismatchError, require_scheme
from imgemb_assets.core.lake import tables
from imgemb_assets.core.storage.names import partition_key_problem
from imgemb_assets.core.storage.open_store import open_object_store
from imgemb_assets.core.storage.s3 import S3ConfigError, S3Settings
from imgemb_assets.dagster_wiring.location.partitions import register_prefixes
from imgemb_assets.dagster_wiring.location.settings import LocationSettings, SettingsError
from imgemb_assets.dagster_wiring.names import S3_PREFIX_PARTITIONS_NAME

if TYPE_CHECKING:
    from imgemb_assets.core.lake.lake import Lake
    from imgemb_assets.core.search.similar import SimilarImage
    from imgemb_assets.dagster_wiring.backfills import BackfillPlan, RunOutcome

# Each command is a process of its own in the user's path: it imports only what it uses
# (the assets and their libraries only where runs are planned or executed).
PARTITIONED_ASSETS = tuple(name for name in tables.ALL_TABLES if name != tables.SALES)
# The commands that read or change the Dagster instance (and so need DAGSTER_HOME).
_INSTANCE_COMMANDS = frozenset({"discover", "backfill-missing", "status"})


class CommandError(Exception):
    """A problem the operator can fix; printed without a traceback."""


def required_env(name: str, environ: Mapping[str, str]) -> str:
    value = environ.get(name)
    if not value:
        raise CommandError(f"{name} is not set")
    return value


def discover(
    instance: DagsterInstance, raw_images_uri: str, register: bool = True, environ: Mapping[str, str] | None = None
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
            require_scheme(_lake_of(lake_uri), scheme)
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
    with DagsterInstance.get() as instance:
        _discover_and_report(instance)
    return 0


def _discover_and_report(instance: DagsterInstance, register: bool = True) -> None:
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
    with DagsterInstance.get() as instance:
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


def _similar_command(args: argparse.Namespace) -> int:
    # usearch, pyarrow and (for --image and --text) torch load here only: the other commands never pay for them.
    from imgemb_assets.core.embedding.model_settings import model_id_has_random_weights
    from imgemb_assets.core.search.similar import (
        SimilarError,
        SimilarImages,
        candidate_count,
        similar_to_id,
        similar_to_photo,
        similar_to_text,
    )

    _check_similar_query(args)
    lake = _lake_of(required_env("IMGEMB_LAKE_URI", os.environ))
    try:
        if args.image_id is None:
            # A photo or a text: embedded here by the query model, then answered from that model's index.
            by_text = args.text is not None
            weights = _query_weights(args)
            search: Callable[..., SimilarImages] = similar_to_text if by_text else similar_to_photo
            found = search(
                lake,
                args.text if by_text else _read_photo(args.image),
                weights,
                args.k,
                args.sales_weight,
                device=args.device,
                model=_query_model(args, weights, text=by_text),
                where=args.where,
            )
            query = f"the text {args.text!r}" if by_text else args.image
        else:
            found = similar_to_id(lake, args.image_id, args.k, args.prefix, args.sales_weight, where=args.where)
            query = args.image_id if args.prefix is None else f"{args.image_id} (prefix {args.prefix})"
    except SimilarError as exc:
        raise CommandError(str(exc)) from exc
    except OSError as exc:  # the search index is read with pyarrow, beside the lake's Delta tables
        refusal = lake.denied_access_refusal(exc)
        if refusal is None:
            raise
        raise refusal from exc
    among = "" if found.where is None else f" among those where {found.where}"
    print(f"{len(found)} images most similar to {query}{among}, from the search index of model {found.model_id}")
    if found.matching is not None and found.matching < args.k:
        print(f"only {found.matching} of the indexed images match --where {found.where}")
    if model_id_has_random_weights(found.model_id):
        print(
            "warning: this model's weights are random (never trained): "
            + (
                "a text's answer is noise"
                if args.text is not None
                else "similar here means similar colours and layout, not similar products"
            )
        )
    if args.sales_weight > 0:
        print(
            f"ranked by score = {1 - args.sales_weight:g} x similarity + {args.sales_weight:g} x sales percentile "
            f"among the {candidate_count(args.k)} most similar"
        )
    print(_table_of(found))
    return 0


def _location_model() -> str:
    """The backbone the location embeds with (IMGEMB_MODEL): a photo is embedded by it too."""
    try:
        return LocationSettings.from_environ(os.environ).model
    except SettingsError as exc:
        raise CommandError(str(exc)) from exc


def _check_similar_query(args: argparse.Namespace) -> None:
    """One query of the three kinds, with only the options that kind takes; CommandError in one line if not."""
    given = [args.image_id is not None, args.image is not None, args.text is not None]
    if sum(given) != 1:
        raise CommandError("give one of IMAGE_ID, --image PATH_OR_S3_URI or --text TEXT")
    if args.prefix is not None and args.image_id is None:
        what = "a photo given with --image" if args.image is not None else "a text given with --text"
        raise CommandError(f"--prefix names the prefix of an IMAGE_ID; {what} has none")
    chosen = [f"--{name}" for name in ("weights", "model", "device") if getattr(args, name) is not None]
    if args.image_id is not None and chosen:
        raise CommandError(
            f"{', '.join(chosen)}: only for a query by photo (--image) or by text (--text); an IMAGE_ID is answered "
            "from the index of the model that embedded it"
        )
    if args.device is None:
        args.device = "auto"


def _query_weights(args: argparse.Namespace) -> str:
    """--weights, else IMGEMB_MODEL_WEIGHTS: the weights the code location embeds with."""
    if args.weights is not None:
        return str(args.weights)
    weights = os.environ.get("IMGEMB_MODEL_WEIGHTS")
    if not weights:
        raise CommandError(
            "IMGEMB_MODEL_WEIGHTS is not set: give the weights the images were embedded with (--weights)"
        )
    return weights


def _query_model(args: argparse.Namespace, weights: str, text: bool) -> str:
    """--model, else open_clip_dir for a checkpoint folder, else the location's model (IMGEMB_MODEL, default
    resnet50), except that a text needs a CLIP: clip_vit_b_32 when the location's model has no text tower."""
    if args.model is not None:
        return str(args.model)
    if Path(weights).is_dir():
        return "open_clip_dir"
    location_model = _location_model()
    if text and not has_text_tower(location_model):
        return "clip_vit_b_32"
    return location_model


def _lake_of(lake_uri: str) -> Lake:
    # As the location's StorageResource.lake() builds it, from the standard AWS variables.
    from imgemb_assets.core.lake.lake import Lake

    if lake_uri.startswith("s3://"):
        return Lake(lake_uri, storage_options=S3Settings().delta_storage_options_provider())
    return Lake(lake_uri)


def _read_photo(location: str) -> bytes:
    """The bytes of a local file or an s3:// object (the standard AWS variables reach S3)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from imgemb_assets.core.storage.objects import ObjectMissing, StorageError

    if location.startswith("s3://"):
        bucket = location[len("s3://") :].split("/", 1)[0]
        try:
            # The bucket as the store's root: its reads check the key and retry a broken body as the pipeline's do.
            return open_object_store(f"s3://{bucket}", S3Settings()).read_bytes(location)
        except ObjectMissing as exc:
            raise CommandError(f"cannot read {location}: no such object") from exc
        except (StorageError, ClientError, BotoCoreError) as exc:
            raise CommandError(f"cannot read {location}: {exc}") from exc
    try:
        with open(location, "rb") as file:
            return file.read()
    except OSError as exc:
        raise CommandError(f"cannot read {location}: {exc.strerror or exc}") from exc


def _table_of(images: Sequence[SimilarImage]) -> str:
    """rank, image_id, prefix, similarity, score, then the sales columns, in aligned columns."""
    sales_columns = list(dict.fromkeys(column for image in images for column in image.sales))
    header = ["rank", "image_id", "prefix", "similarity", "score", *sales_columns]
    rows = [
        [
            str(rank),
            image.image_id,
            image.prefix,
            f"{image.similarity:.4f}",
            f"{image.score:.4f}",
            *(_shown(image.sales[column]) if column in image.sales else "-" for column in sales_columns),
        ]
        for rank, image in enumerate(images, start=1)
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]
    )


def _shown(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.10g}"  # whole sales show as 2997, not 2997.0; prices keep their cents
    return str(value)


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
            "similar": _similar_command,
        }
        return handlers[args.command](args)
    except (CommandError, S3ConfigError) as exc:  # a refusal to fix by hand: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
