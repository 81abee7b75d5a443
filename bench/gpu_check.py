"""The prepared device check of issue 24: decoders, eager and compiled model, errors, the step; a JSON line last.

    python bench/gpu_check.py [--corpus DIR] [--images 8192] [--e2e-rows 20000] [--budget-s 420]
    python bench/gpu_check.py --dry-run     (CPU, reduced sizes: every part runs; no figure means anything)

Needs torch, torchvision, numpy and Pillow. nvImageCodec (`nvidia-nvimgcodec-cu13[nvjpeg]`) is measured
when it imports; the Delta part needs the project's lake (deltalake, pyarrow, boto3) and says which is
missing when it is skipped. Random-initialised weights throughout: throughput does not depend on them.
The compile caches (inductor's and Triton's) start empty, so the compile's seconds are a fresh machine's.

1. reference  fp32 CPU vectors of 64 thumbnails: the article's per-image ToTensor + Normalize + model.
2. decode     each backend alone, into device memory, synchronized (images/s), and its pixels against
              Pillow's on the same thumbnails (max |difference|, share of values that differ).
3. model      model-only images/s, eager and compiled (CUDA graphs, one batch shape), the compile's seconds.
4. embed      the embed stage (`embed_thumbnails` on thumbnails in memory) for each working backend, eager
              and compiled, and its ratio to compiled model-only.
5. error      each backend, eager and compiled, against (1): max relative error and lowest cosine; bf16
              eager for the record.
6. warm       a second process compiles with the caches the first one filled: what a later step pays.
7. step       the embedding step's core calls (`embed_partition_batches`, 2048-row record batches as the
              step reads them) on an in-memory partition (pyarrow only); then the same through a local
              Delta table: read, stage, write (`Lake`), a partition of `--e2e-rows` thumbnails.
              The model is compiled already: its compile is reported in (3).

Checks on CUDA (exit status 1 when one fails): the default decoder's compiled vectors within 2e-3 of fp32;
its embed stage >= 0.85x compiled model-only; the Delta step, when it ran, >= 0.8x compiled model-only.
A part that would not fit in what is left of `--budget-s` is skipped, saying so.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from imgemb_assets.core import embedding_bench as bench
from imgemb_assets.core.embedding.inference import decode_batch, embed_thumbnails, forward_for
from imgemb_assets.core.embedding.model_settings import EmbeddingSettings
from imgemb_assets.core.embedding.models import EmbeddingModel, load_model
from imgemb_assets.core.embedding.thumbnail_decoders import (
    DecodedBatch,
    DecoderUnavailable,
    NvimgcodecDecoder,
    NvjpegDecoder,
    PillowDecoder,
    ThumbnailDecoder,
    nvimgcodec_available,
    working_decoder,
)

RELATIVE_TOLERANCE: Final = 2e-3
TARGET_EMBED_RATIO: Final = 0.85  # embed stage / compiled model-only
TARGET_STEP_RATIO: Final = 0.8  # the whole step on a partition / compiled model-only
REFERENCE_IMAGES: Final = 64
PIXEL_SAMPLE: Final = 256
DISTINCT_THUMBNAILS: Final = 200  # made once and cycled: making each costs a downscale
PILLOW_IMAGES: Final = 2048  # Pillow decodes ~2k img/s on one thread: fewer images keep it short
# Rows per record batch as the embedding step reads the joined table (dagster_wiring.embedding.step's
# _EMBEDDING_READ_ROWS, not imported: that module needs Dagster).
STEP_READ_ROWS: Final = 2048
PREFIX: Final = "gpu-check"
# Seconds each optional part is expected to need on an H100; skipped when less is left.
_WARM_COMPILE_S: Final = 90
_STEP_S: Final = 60
_CACHES_VARIABLE: Final = "IMGEMB_GPU_CHECK_CACHES"


@dataclasses.dataclass
class Budget:
    seconds: float
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def fresh_compile_caches() -> str:
    """Empty inductor and Triton caches for this run (a warm-compile child inherits them); their root."""
    root = os.environ.get(_CACHES_VARIABLE) or tempfile.mkdtemp(prefix="gpu_check_caches_")
    os.environ[_CACHES_VARIABLE] = root
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{root}/inductor"
    os.environ["TRITON_CACHE_DIR"] = f"{root}/triton"
    return root


def cycled_thumbnails(corpus: Path | None, count: int) -> list[bytes]:
    distinct = min(count, DISTINCT_THUMBNAILS)
    made = bench.thumbnails_from(corpus, distinct) if corpus else bench.generated_thumbnails(distinct, distinct)
    return [made[i % len(made)] for i in range(count)]


def reference_embeddings(jpegs: list[bytes], model_name: str) -> np.ndarray:
    """The article's computation in fp32 on CPU, per image, with the same random weights as the model checked."""
    settings = EmbeddingSettings(
        weights="random", device="cpu", model=model_name, precision="fp32", runtime="eager", compile=False,
        decoder="pillow",
    )  # fmt: skip
    model = load_model(settings)
    # The backbone's own normalization (ImageNet's for torchvision's, OpenAI's for a CLIP); all take 224 px as stored.
    normalization = model.preprocessing.normalization
    normalize = transforms.Normalize(normalization.mean, normalization.std)
    transform = transforms.Compose([transforms.ToTensor(), normalize])
    with torch.inference_mode():
        return np.stack(
            [model.module(transform(Image.open(io.BytesIO(j)).convert("RGB"))[None])[0].numpy() for j in jpegs]
        )


def error_against(got: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """Max |difference| over max |reference| (the project's relative error), and what search sees: cosine."""
    cosine = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    return {
        "max_relative_error": float(np.abs(got - expected).max() / np.abs(expected).max()),
        "min_cosine": float(cosine.min()),
    }


def decoder_builders(device: torch.device) -> dict[str, Callable[[torch.device], ThumbnailDecoder]]:
    """The backends measured: the three settings, and nvImageCodec restricted to one kind of backend."""
    if device.type != "cuda":  # nvImageCodec's CPU backend: pixels to compare, never the CPU path
        return {"pillow": PillowDecoder, "nvimgcodec-cpu": NvimgcodecDecoder}
    return {
        "pillow": PillowDecoder,
        "nvjpeg": NvjpegDecoder,
        "nvimgcodec": NvimgcodecDecoder,
        "nvimgcodec-hw": lambda d: NvimgcodecDecoder(d, ("HW_GPU_ONLY",)),
        "nvimgcodec-cuda": lambda d: NvimgcodecDecoder(d, ("GPU_ONLY",)),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_images_per_second(decoder: ThumbnailDecoder, thumbnails: list[bytes], batch_size: int, rounds: int) -> float:
    device = getattr(decoder, "device", torch.device("cpu"))
    batches = [thumbnails[start : start + batch_size] for start in range(0, len(thumbnails), batch_size)]
    decoder.decode(batches[0])  # warm-up: workspaces, thread pools
    best = 0.0
    for _ in range(rounds):
        synchronize(device)
        started = time.perf_counter()
        # Held until synchronized: a library's buffers must outlive the copies queued out of them.
        decoded: list[DecodedBatch] = [decoder.decode(batch) for batch in batches]
        synchronize(device)
        best = max(best, len(thumbnails) / (time.perf_counter() - started))
        del decoded
    return best


def pixels_against_pillow(decoder: ThumbnailDecoder, thumbnails: list[bytes]) -> dict[str, float]:
    sample = thumbnails[:PIXEL_SAMPLE]
    ours = decoder.decode(sample).pixels.cpu().to(torch.int16)
    difference = (ours - decode_batch(sample).to(torch.int16)).abs()
    return {
        "max_abs_difference": int(difference.max()),
        "mean_abs_difference": round(float(difference.float().mean()), 4),
        "share_differing": round(float((difference > 0).float().mean()), 4),
    }


def best_of(rounds: int, measure: Callable[[], float]) -> float:
    return max(measure() for _ in range(rounds))


def measure_decoders(args: argparse.Namespace, device: torch.device, thumbnails: list[bytes],
                     batch_size: int) -> tuple[dict[str, Any], dict[str, ThumbnailDecoder]]:  # fmt: skip
    report: dict[str, Any] = {}
    working: dict[str, ThumbnailDecoder] = {}
    for name, build in decoder_builders(device).items():
        try:
            decoder = working_decoder(build, device)
        except DecoderUnavailable as exc:
            report[name] = {"unavailable": str(exc)}
            print(f"decode  {name:16s} unavailable: {exc}", flush=True)
            continue
        count = min(len(thumbnails), PILLOW_IMAGES) if name == "pillow" else len(thumbnails)
        images_per_second = decode_images_per_second(decoder, thumbnails[:count], batch_size, args.decode_rounds)
        report[name] = {"decode_img_s": round(images_per_second, 1), **pixels_against_pillow(decoder, thumbnails)}
        working[name] = decoder
        print(f"decode  {name:16s} {images_per_second:10.1f} img/s  pixels vs Pillow {report[name]}", flush=True)
    return report, working


def measure_model(args: argparse.Namespace, model: EmbeddingModel, thumbnails: list[bytes]) -> dict[str, Any]:
    eager = dataclasses.replace(model, compiled=None)
    report: dict[str, Any] = {
        "eager_img_s": round(best_of(args.rounds, lambda: bench.model_only_images_per_second(eager, thumbnails)), 1)
    }
    print(f"model   eager     {report['eager_img_s']:10.1f} img/s", flush=True)
    if model.compiled is not None:
        compiled_img_s = best_of(args.rounds, lambda: bench.model_only_images_per_second(model, thumbnails))
        report |= model.runtime_metadata()
        report["compiled_img_s"] = round(compiled_img_s, 1) if model.compiled.failure is None else None
        # 0: the compiled model replays CUDA graphs (inductor logs why when it declines them).
        report["cudagraph_skips"] = dynamo_counter("inductor", "cudagraph_skips")
        print(f"model   compiled  {compiled_img_s:10.1f} img/s  {model.runtime_metadata()}", flush=True)
    return report


def dynamo_counter(group: str, name: str) -> int | None:
    """One of dynamo's counters (private, hence only here, in a benchmark); None where it moved."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters[group][name])


def measure_embed_stage(args: argparse.Namespace, model: EmbeddingModel, working: dict[str, ThumbnailDecoder],
                        thumbnails: list[bytes], compiled_model_only: float | None) -> dict[str, Any]:  # fmt: skip
    report: dict[str, Any] = {}
    for name, decoder in working.items():
        count = min(len(thumbnails), PILLOW_IMAGES) if name == "pillow" else len(thumbnails)
        rows: dict[str, Any] = {}
        for variant, variant_model in _variants(model, decoder):
            img_s = best_of(
                args.rounds, partial(bench.embed_stage_images_per_second, variant_model, thumbnails[:count])
            )
            rows[f"{variant}_img_s"] = round(img_s, 1)
            if compiled_model_only:
                rows[f"{variant}_vs_compiled_model_only"] = round(img_s / compiled_model_only, 3)
        report[name] = rows
        print(f"embed   {name:16s} {rows}", flush=True)
    return report


def measure_errors(model: EmbeddingModel, working: dict[str, ThumbnailDecoder], jpegs: list[bytes],
                   expected: np.ndarray) -> dict[str, Any]:  # fmt: skip
    report: dict[str, Any] = {}
    for name, decoder in working.items():
        vectors = {variant: embed_thumbnails(m, jpegs) for variant, m in _variants(model, decoder)}
        report[name] = {variant: error_against(got, expected) for variant, got in vectors.items()}
        if "compiled" in vectors:  # what compiling alone moves a vector by
            report[name]["compiled_vs_eager"] = error_against(vectors["compiled"], vectors["eager"])
        print(f"error   {name:16s} {report[name]}", flush=True)
    return report


def _variants(model: EmbeddingModel, decoder: ThumbnailDecoder) -> Iterator[tuple[str, EmbeddingModel]]:
    """The model with this decoder, eager; and compiled, when its compile succeeded (one compile, shared)."""
    yield "eager", dataclasses.replace(model, decoder=decoder, compiled=None)
    if model.compiled is not None and model.compiled.failure is None and model.compiled.compile_seconds is not None:
        yield "compiled", dataclasses.replace(model, decoder=decoder)


def warm_compile(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """A fresh process building and compiling the same model with the caches this one filled."""
    if budget.left() < _WARM_COMPILE_S:
        return {"skipped": f"{budget.left():.0f} s of the budget left, {_WARM_COMPILE_S} s needed"}
    command = [sys.executable, __file__, "--compile-probe", "--model", args.model, "--device", args.device,
               "--precision", args.precision, "--batch-size", str(args.batch_size)]  # fmt: skip
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(budget.left() - 30, 30), check=True)
        probe = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return {"failed": f"{type(exc).__name__}: {str(getattr(exc, 'stderr', '') or exc)[-500:]}"}
    return {**probe, "process_s": round(time.perf_counter() - started, 2)}


def compile_probe(args: argparse.Namespace) -> None:
    """The child of `warm_compile`: compile seconds with warm caches, as a later step's process pays them."""
    model = load_model(_settings(args, torch.device(args.device)))
    assert model.compiled is not None
    forward_for(model, model.compiled.batch_size)  # compiles, on a batch of zero pixels
    print(json.dumps(model.runtime_metadata()))


def measure_step(args: argparse.Namespace, model: EmbeddingModel, thumbnails: list[bytes],
                 compiled_model_only: float | None, budget: Budget) -> dict[str, Any]:  # fmt: skip
    """The embedding step's core on a partition: in memory (pyarrow), then through a local Delta table."""
    if budget.left() < _STEP_S:
        return {"skipped": f"{budget.left():.0f} s of the budget left, {_STEP_S} s needed"}
    try:
        import pyarrow as pa

        from imgemb_assets.core.embedding.partition import EmbeddingRun, SharedModel, embed_partition_batches
        from imgemb_assets.core.lake import tables
    except ImportError as exc:
        return {"skipped": f"{exc.name} is not importable here"}

    class _Compiled(SharedModel):
        """The model measured above, compiled already, so the step's seconds exclude the compile."""

        def get(self) -> EmbeddingModel:
            return model

    rows = args.e2e_rows
    jpegs = [thumbnails[i % len(thumbnails)] for i in range(rows)]
    sales = pa.schema(tables.SALES_REQUIRED_FIELDS)
    joined = pa.table(
        {"image_id": [f"img_{i:06d}" for i in range(rows)], tables.PARTITION_COLUMN: [PREFIX] * rows,
         "etag": [f"etag-{i}" for i in range(rows)], "width": [224] * rows, "height": [224] * rows,
         "image_jpeg": jpegs, "sales": [float(i) for i in range(rows)]},
        schema=tables.images_with_sales_schema(sales),
    )  # fmt: skip
    schema = tables.image_embeddings_schema(sales)
    shared = _Compiled(_settings(args, model.device))
    report: dict[str, Any] = {"rows": rows}

    run = EmbeddingRun()
    started = time.perf_counter()
    written = sum(
        b.num_rows for b in embed_partition_batches(joined.to_batches(STEP_READ_ROWS), None, shared, schema, run)
    )
    report["in_memory"] = _step_figures(written, time.perf_counter() - started, run, compiled_model_only)
    print(f"step    in memory {report['in_memory']}", flush=True)
    report["delta"] = _delta_step(joined, schema, shared, compiled_model_only)
    print(f"step    delta     {report['delta']}", flush=True)
    return report


def _delta_step(joined: Any, schema: Any, shared: Any, compiled_model_only: float | None) -> dict[str, Any]:
    """As dagster_wiring.embedding.step.embed_prefix calls the core for a new partition, without Dagster."""
    try:
        from imgemb_assets.core.embedding.partition import EmbeddingRun, embed_partition_batches
        from imgemb_assets.core.embedding.staging import PartitionStaging
        from imgemb_assets.core.lake import tables
        from imgemb_assets.core.lake.lake import Lake
    except ImportError as exc:
        return {"skipped": f"{exc.name} is not importable here (the project's lake needs deltalake, pyarrow, boto3)"}
    with tempfile.TemporaryDirectory(prefix="gpu_check_lake_") as root:
        lake = Lake(root)
        lake.write_partition(tables.IMAGES_WITH_SALES, joined, PREFIX)
        run = EmbeddingRun()
        started = time.perf_counter()
        batches = lake.read_batches(tables.IMAGES_WITH_SALES, PREFIX, batch_rows=STEP_READ_ROWS)
        staging = PartitionStaging(lake, tables.IMAGE_EMBEDDINGS, PREFIX, shared.model_id)
        stream = embed_partition_batches(batches, None, shared, schema, run, staging=staging)
        written = lake.write_partition_stream(tables.IMAGE_EMBEDDINGS, stream, schema, PREFIX)
        staging.clear()
        seconds = time.perf_counter() - started
        stored = lake.read(tables.IMAGE_EMBEDDINGS, PREFIX, columns=["image_id"]).num_rows
    return {**_step_figures(written, seconds, run, compiled_model_only), "rows_read_back": stored}


def _step_figures(rows: int, seconds: float, run: Any, compiled_model_only: float | None) -> dict[str, Any]:
    figures = {"rows": rows, "seconds": round(seconds, 3), "img_s": round(rows / seconds, 1),
               "embedding_seconds": round(run.seconds, 3), "staging_seconds": round(run.staging_seconds, 3)}  # fmt: skip
    if compiled_model_only:
        figures["vs_compiled_model_only"] = round(rows / seconds / compiled_model_only, 3)
    return figures


def _settings(args: argparse.Namespace, device: torch.device) -> EmbeddingSettings:
    # CUDA: the default compile (on; a failed compile leaves the model eager and says why, so the
    # other figures still come). CPU (dry run): compile asked for, so the compiled path runs too.
    return EmbeddingSettings(
        weights="random", device=str(device), model=args.model, precision=args.precision,
        batch_size=args.batch_size, compile=None if device.type == "cuda" else True,
    )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None, help="folder of photos to make thumbnails from")
    parser.add_argument("--images", type=int, default=None, help="thumbnails per measurement (8192; dry run 32)")
    parser.add_argument("--e2e-rows", type=int, default=None, help="rows of the step's partition (20000; dry run 48)")
    parser.add_argument("--model", default=None, help="backbone (resnet50; dry run resnet18)")
    parser.add_argument("--batch-size", type=int, default=None, help="(256 on CUDA; dry run 8)")
    parser.add_argument("--precision", default=None, help="(auto: fp16 on CUDA; fp32 on CPU)")
    parser.add_argument("--device", default=None, help="(cuda; dry run cpu)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-rounds", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=420, help="skip optional parts past this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="CPU, reduced sizes: checks that every part runs")
    parser.add_argument("--compile-probe", action="store_true", help=argparse.SUPPRESS)
    return parser


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    dry = args.dry_run
    defaults = {"images": 32 if dry else 8192, "e2e_rows": 48 if dry else 20_000, "model": "resnet18" if dry else "resnet50",
                "batch_size": 8 if dry else 256, "precision": "auto", "device": "cpu" if dry else "cuda"}  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if dry:
        args.rounds, args.decode_rounds = 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = _defaults(_parser().parse_args(argv))
    caches = fresh_compile_caches()
    if args.compile_probe:
        compile_probe(args)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the reduced CPU check", file=sys.stderr)
        return 1
    budget = Budget(args.budget_s)
    summary: dict[str, Any] = {
        "dry_run": args.dry_run, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "nvimgcodec": nvimgcodec_available() or "imports",
        "model": args.model, "batch_size": args.batch_size, "images": args.images, "compile_caches": caches,
    }  # fmt: skip
    print(json.dumps(summary), flush=True)

    thumbnails = cycled_thumbnails(args.corpus, args.images)
    summary["thumbnail_kb"] = round(float(np.mean([len(t) for t in thumbnails])) / 1024, 1)
    reference_jpegs = thumbnails[: min(REFERENCE_IMAGES, len(thumbnails))]
    expected = reference_embeddings(reference_jpegs, args.model)

    model = load_model(_settings(args, device))
    summary |= {"precision": str(model.dtype).removeprefix("torch."), "default_decoder": model.decoder.name,
                "default_decoder_note": model.decoder_note}  # fmt: skip
    summary["decode"], working = measure_decoders(args, device, thumbnails, model.batch_size)
    summary["model_only"] = measure_model(args, model, thumbnails)
    compiled_model_only = summary["model_only"].get("compiled_img_s")
    summary["embed_stage"] = measure_embed_stage(args, model, working, thumbnails, compiled_model_only)
    summary["error"] = measure_errors(model, working, reference_jpegs, expected)
    bf16 = load_model(dataclasses.replace(_settings(args, device), precision="bf16", compile=False,
                                          decoder=model.decoder.name))  # fmt: skip
    summary["error_bf16_eager"] = error_against(embed_thumbnails(bf16, reference_jpegs), expected)
    del bf16
    summary["warm_compile"] = warm_compile(args, budget) if model.compiled is not None else {"skipped": "not compiled"}
    print(f"warm    {summary['warm_compile']}", flush=True)
    summary["step"] = measure_step(args, model, thumbnails, compiled_model_only, budget)
    # 1 when nothing recompiled: every batch reached the compiled graph in one shape, dtype and layout.
    summary["compiled_graphs"] = dynamo_counter("stats", "unique_graphs")
    summary["checks"] = checks(summary, model.decoder.name) if device.type == "cuda" else {}
    summary["checks_passed"] = all(summary["checks"].values())
    summary["elapsed_s"] = round(budget.elapsed(), 1)
    shutil.rmtree(caches, ignore_errors=True)  # this run's own: made empty at its start
    print(json.dumps(summary), flush=True)
    return 0 if summary["checks_passed"] else 1


def checks(summary: dict[str, Any], default_decoder: str) -> dict[str, bool]:
    """The issue's bars, for the decoder `auto` chose and the compiled model."""
    error = summary["error"].get(default_decoder, {}).get("compiled")
    embed = summary["embed_stage"].get(default_decoder, {}).get("compiled_vs_compiled_model_only")
    result = {
        "compiled_fp16_error_within_2e-3": error is not None and error["max_relative_error"] <= RELATIVE_TOLERANCE,
        "embed_stage_at_least_0.85x_compiled_model_only": embed is not None and embed >= TARGET_EMBED_RATIO,
    }
    delta = summary["step"].get("delta", {}) if isinstance(summary["step"], dict) else {}
    if "vs_compiled_model_only" in delta:
        result["step_at_least_0.8x_compiled_model_only"] = delta["vs_compiled_model_only"] >= TARGET_STEP_RATIO
    return result


if __name__ == "__main__":
    sys.exit(main())
