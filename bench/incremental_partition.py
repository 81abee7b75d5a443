"""One photo added to a big partition: its rewrite, as a fraction of the partition's first write.

    python -m bench.incremental_partition --corpus DIR [--photos 10000] [--model resnet50|resnet18]
                                          [--device auto|cpu|cuda]

DIR is a corpus made by `../shared/corpus/make_corpus.py` (`DIR/raw-images/**`,
`DIR/sales-data/`; e.g. `--n 10001 --layout flat`). N photos of it are linked
(hard links, so regular files with their real bytes: the manifest reads and
fingerprints each) into ONE folder of a fresh local raw-images root,
`root/big/`, which the default scheme `folders` makes one partition, `big`; one
more photo with a sales row is held back. On a fresh Dagster instance
(`instance_for_test`) and a fresh local lake, in this process (in-process
executor, random-initialised weights of --model on --device): the sales job,
then the `embed_prefix` job for `big` (the first write, timed); then the held-back
photo is added to the folder and the job runs again (manifest, thumbnails, join,
embeddings, evaluation: the rewrite, timed). The first write also pays for
importing torch and building the model once; so does the rewrite's model build
(it has one image to embed).

Prints both runs side by side: wall seconds, each step's seconds (from the run's
step stats), `objects_decoded` / `objects_reused` (downscaled_images) and
`images_embedded` / `images_reused` (image_embeddings) from the instance's latest
materializations; then the summary, with the rewrite-over-first ratio (target
<= 0.10) and what the rewrite decoded and embedded (target 1 and 1). Ends with
one JSON line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from dagster import AssetKey, DagsterInstance, instance_for_test

from bench import print_summary
from imgemb_assets.core.lake import tables
from imgemb_assets.dagster_wiring.embedding.resources import EmbeddingModelResource
from imgemb_assets.dagster_wiring.location.settings import LocationSettings
from imgemb_assets.dagster_wiring.names import PREFIX_JOB_NAME, S3_PREFIX_PARTITIONS_NAME, SALES_JOB_NAME
from imgemb_assets.definitions import build_definitions

PARTITION = "big"
_PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png"}
# decoded / embedded by the rewrite, and the rewrite's share of the first write
TARGET_NEW = 1
TARGET_RATIO = 0.10


@dataclass(frozen=True)
class Run:
    seconds: float
    steps: dict[str, float]  # step key -> seconds, in the order the steps started
    objects_decoded: int
    objects_reused: int
    images_embedded: int
    images_reused: int
    embedding_rows: int
    device: str


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem: copy the bytes
        shutil.copyfile(source, target)


def choose_photos(corpus: Path, photos: int) -> tuple[list[Path], Path]:
    """The first `photos` photos of the corpus (by name), and one more, with a sales row, held back."""
    found = sorted(
        (p for p in (corpus / "raw-images").rglob("*") if p.is_file() and p.suffix.lower() in _PHOTO_SUFFIXES),
        key=lambda p: p.name,
    )
    with_sales = set(pq.read_table(corpus / "sales-data", columns=["image_id"]).column("image_id").to_pylist())
    candidates = [p for p in found[photos:] if p.suffix.lower() == ".jpg" and p.stem in with_sales]
    if len(found) < photos or not candidates:
        raise SystemExit(
            f"{corpus} holds {len(found)} photos: --photos {photos} needs that many plus one more JPEG with a "
            f"sales row (make_corpus.py --n {photos + 1})"
        )
    return found[:photos], candidates[0]


def _metadata(instance: DagsterInstance, table: str, run_id: str) -> dict[str, object]:
    event = instance.get_latest_materialization_event(AssetKey(table))
    if event is None or event.run_id != run_id:
        raise SystemExit(f"run {run_id} did not materialize {table}")
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


def run_job(instance: DagsterInstance, job: object) -> Run:
    started = time.perf_counter()
    result = job.execute_in_process(instance=instance, partition_key=PARTITION)  # type: ignore[attr-defined]
    seconds = time.perf_counter() - started
    stats = sorted(instance.get_run_step_stats(result.run_id), key=lambda s: s.start_time or 0.0)
    steps = {s.step_key: round((s.end_time or 0.0) - (s.start_time or 0.0), 2) for s in stats}
    thumbnails = _metadata(instance, tables.DOWNSCALED_IMAGES, result.run_id)
    embeddings = _metadata(instance, tables.IMAGE_EMBEDDINGS, result.run_id)
    return Run(
        seconds=seconds,
        steps=steps,
        objects_decoded=int(thumbnails["objects_decoded"]),
        objects_reused=int(thumbnails["objects_reused"]),
        images_embedded=int(embeddings["images_embedded"]),
        images_reused=int(embeddings["images_reused"]),
        embedding_rows=int(embeddings.get("dagster/row_count", embeddings.get("rows", -1))),
        device=str(embeddings.get("device", "model not loaded")),
    )


def print_side_by_side(first: Run, rewrite: Run) -> None:
    rows: list[tuple[str, object, object]] = [
        ("wall s", round(first.seconds, 2), round(rewrite.seconds, 2)),
        *((f"  step {key} s", first.steps.get(key, "-"), rewrite.steps.get(key, "-"))
          for key in dict.fromkeys([*first.steps, *rewrite.steps])),
        ("objects_decoded", first.objects_decoded, rewrite.objects_decoded),
        ("objects_reused", first.objects_reused, rewrite.objects_reused),
        ("images_embedded", first.images_embedded, rewrite.images_embedded),
        ("images_reused", first.images_reused, rewrite.images_reused),
        ("image_embeddings rows", first.embedding_rows, rewrite.embedding_rows),
        ("device", first.device, rewrite.device),
    ]  # fmt: skip
    width = max(len(name) for name, _, _ in rows)
    print(f"| {'':{width}s} | {'first write':>14s} | {'rewrite (+1)':>14s} |")
    print(f"| {'-' * width} | {'-' * 14} | {'-' * 14} |")
    for name, a, b in rows:
        print(f"| {name:{width}s} | {a!s:>14s} | {b!s:>14s} |")
    print()


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="DIR with raw-images/ and sales-data/")
    parser.add_argument("--photos", type=int, default=10000, help="photos in the partition's first write")
    parser.add_argument("--model", choices=["resnet50", "resnet18"], default="resnet50")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    corpus = args.corpus.resolve()
    photos, held_back = choose_photos(corpus, args.photos)
    model = EmbeddingModelResource(weights="random", model=args.model, device=args.device)
    defs = build_definitions(LocationSettings(), {"embedding_model": model})  # the default scheme: folders
    with tempfile.TemporaryDirectory(prefix="imgemb-incr-") as scratch, instance_for_test() as instance:
        folder = Path(scratch) / "raw-images" / PARTITION
        folder.mkdir(parents=True)
        for photo in photos:
            _link(photo, folder / photo.name)
        os.environ.update(
            IMGEMB_RAW_IMAGES_URI=str(folder.parent), IMGEMB_SALES_URI=str(corpus / "sales-data"),
            IMGEMB_LAKE_URI=str(Path(scratch) / "lake"), IMGEMB_MODEL_WEIGHTS="random",
        )  # fmt: skip
        instance.add_dynamic_partitions(S3_PREFIX_PARTITIONS_NAME, [PARTITION])
        started = time.perf_counter()
        defs.resolve_job_def(SALES_JOB_NAME).execute_in_process(instance=instance)
        sales_s = time.perf_counter() - started
        job = defs.resolve_job_def(PREFIX_JOB_NAME)
        first = run_job(instance, job)
        print(f"first write: {len(photos)} photos in {first.seconds:.1f} s", flush=True)
        _link(held_back, folder / held_back.name)
        rewrite = run_job(instance, job)
        print(f"rewrite: {held_back.name} added, {rewrite.seconds:.1f} s", flush=True)
    print()
    print_side_by_side(first, rewrite)
    ratio = rewrite.seconds / first.seconds
    summary: dict[str, object] = {
        "photos": len(photos),
        "added_photo": held_back.name,
        "model": f"{args.model} (random weights)",
        "device": first.device,
        "cpu_count": os.cpu_count(),
        "sales_job_s": round(sales_s, 2),
        "first_write_s": round(first.seconds, 2),
        "rewrite_s": round(rewrite.seconds, 2),
        "rewrite_over_first": round(ratio, 4),
        "target_ratio_max": TARGET_RATIO,
        "first_objects_decoded": first.objects_decoded,
        "first_images_embedded": first.images_embedded,
        "rewrite_objects_decoded": rewrite.objects_decoded,
        "rewrite_objects_reused": rewrite.objects_reused,
        "rewrite_images_embedded": rewrite.images_embedded,
        "rewrite_images_reused": rewrite.images_reused,
        "target_rewrite_decoded_embedded": TARGET_NEW,
        "meets_targets": ratio <= TARGET_RATIO
        and rewrite.objects_decoded == TARGET_NEW
        and rewrite.images_embedded == TARGET_NEW,
        "first_steps_s": first.steps,
        "rewrite_steps_s": rewrite.steps,
    }
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
