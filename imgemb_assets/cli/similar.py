"""`imgemb similar`: the images most like one in the lake, like a new photo, or matching a text, printed as a table.

The queries themselves are the search domain's Python API (`imgemb_assets.core.search.similar`); this module
turns the command's arguments into one of them and prints its answer."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from imgemb_assets.cli.common import CommandError, lake_of, required_env
from imgemb_assets.core.embedding.backbones.specs import has_text_tower
from imgemb_assets.core.storage.open_store import open_object_store
from imgemb_assets.core.storage.s3 import S3Settings
from imgemb_assets.dagster_wiring.location.settings import LocationSettings, SettingsError

if TYPE_CHECKING:
    from imgemb_assets.core.search.answers import SimilarImage


def similar_command(args: argparse.Namespace) -> int:
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
    lake = lake_of(required_env("IMGEMB_LAKE_URI", os.environ))
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


def _read_photo(location: str) -> bytes:
    """The bytes of a local file or an s3:// object (the standard AWS variables reach S3)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from imgemb_assets.core.storage.errors import ObjectMissing, StorageError

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
