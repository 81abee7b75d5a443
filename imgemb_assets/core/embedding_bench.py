"""Embedding throughput, model alone against the whole embed stage, side by side in one run.

    python -m imgemb_assets.core.embedding_bench [--model resnet50] [--device auto] [--precision auto]
                                       [--runtime auto] [--batch-size N] [--images 512] [--rounds 3]
                                       [--compile | --no-compile] [--decoder auto]
                                       [--corpus DIR] [--reference | --no-reference]

model-only: the same thumbnails, decoded and preprocessed beforehand and already
on the device, through forward passes only (the compiled module when the model
is compiled, each batch padded to its fixed shape; the compile happens in the
warm-up and is reported as `compile_s`).
embed-stage: `embed_thumbnails` on real 224x224 JPEG thumbnails held in memory
(decode, copy, normalize, forward, copy back), as the embedding asset runs it.
Rounds alternate between the two and the best of each is kept, so both see the
same machine. Thumbnails come from `--corpus` (any folder of photos, e.g. the
shared benchmark corpus) or, without it, from the generated sample images.
Random-initialised weights: throughput does not depend on them. Ends with one
JSON line. Needs torch, numpy and Pillow only.

The pinned CPU reference: torchvision eager, fp32, batch 64, torch's default
threads, in a fresh process whose malloc is untouched (runtime `eager`). On
CPU it is measured by default, in a subprocess whose rounds alternate with the
configured model's, and the ratios are printed; `--reference` measures it
alone, `--no-reference` skips it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from imgemb_assets.core.embedding.allocator import malloc_tuning_applied
from imgemb_assets.core.embedding.backbones.specs import BACKBONES
from imgemb_assets.core.embedding.inference import compiled_batch, decode_batch, embed_thumbnails, preprocess
from imgemb_assets.core.embedding.model_settings import DECODERS, PRECISIONS, RUNTIMES, EmbeddingSettings
from imgemb_assets.core.embedding.models import CompiledForward, EmbeddingModel, load_model
from imgemb_assets.core.imaging.images import ImageRejected, downscale
from imgemb_assets.core.imaging.synthetic import synthetic_photo


def thumbnails_from(folder: Path, count: int) -> list[bytes]:
    """`count` stored-format thumbnails made from the images under `folder` (cycled if fewer)."""
    made = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            made.append(downscale(path.read_bytes()).jpeg)
        except ImageRejected:
            continue
        if len(made) == count:
            break
    if not made:
        raise SystemExit(f"no decodable images under {folder}")
    return [made[i % len(made)] for i in range(count)]


def generated_thumbnails(count: int, distinct: int = 200) -> list[bytes]:
    """Thumbnails of synthetic photos of varied sizes (cycled past `distinct`)."""
    rng = np.random.default_rng(0)
    made = []
    for _ in range(min(count, distinct)):
        width, height = (int(v) for v in rng.integers(48, 1024, size=2))
        buffer = io.BytesIO()
        synthetic_photo(rng, width, height).save(buffer, format="JPEG", quality=90)
        made.append(downscale(buffer.getvalue()).jpeg)
    return [made[i % len(made)] for i in range(count)]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only_images_per_second(model: EmbeddingModel, thumbnails: list[bytes]) -> float:
    # The same pictures as the embed stage, decoded and preprocessed up front and
    # already on the device: CPU kernels are not data-independent (random noise
    # through random weights runs measurably slower than photos).
    compiled = model.compiled if model.compiled is not None and model.compiled.worth_using(len(thumbnails)) else None
    forward = compiled if compiled is not None else model.module
    with torch.inference_mode():  # the inputs too: a compiled graph is specialised to inference tensors
        batches = [
            _model_input(model, compiled, decode_batch(thumbnails[start : start + model.batch_size]).to(model.device))
            for start in range(0, len(thumbnails), model.batch_size)
        ]
        forward(batches[0])  # warm-up (and the compile, when compiled)
        _synchronize(model.device)
        started = time.perf_counter()
        for batch in batches:
            forward(batch)
        _synchronize(model.device)
    return len(thumbnails) / (time.perf_counter() - started)


def _model_input(model: EmbeddingModel, compiled: CompiledForward | None, pixels: torch.Tensor) -> torch.Tensor:
    if compiled is None:
        return preprocess(pixels, model.dtype, model.preprocessing)
    return compiled_batch(model, compiled, pixels)


def embed_stage_images_per_second(model: EmbeddingModel, thumbnails: list[bytes]) -> float:
    embed_thumbnails(model, thumbnails[: model.batch_size])  # warm-up
    started = time.perf_counter()
    embed_thumbnails(model, thumbnails)  # returns host arrays, so it is synchronized
    return len(thumbnails) / (time.perf_counter() - started)


def reference_settings(model: str) -> EmbeddingSettings:
    """The pinned CPU reference: eager fp32, batch 64, no allocator tuning. Never change it."""
    return EmbeddingSettings(
        weights="random", device="cpu", batch_size=64, model=model, precision="fp32", runtime="eager"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=BACKBONES, default="resnet50")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--images", type=int, default=512, help="images per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA, off for CPU"
    )
    parser.add_argument("--decoder", choices=DECODERS, default="auto")
    parser.add_argument("--corpus", type=Path, default=None, help="folder of photos to make thumbnails from")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--reference", action="store_true", help="measure only the pinned CPU reference (subprocess)")
    which.add_argument("--no-reference", action="store_true", help="skip the pinned CPU reference")
    # Internal: the subprocess that holds the reference model and measures one round per line on stdin.
    parser.add_argument("--reference-worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def _thumbnails(args: argparse.Namespace, count: int) -> list[bytes]:
    return thumbnails_from(args.corpus, count) if args.corpus else generated_thumbnails(count)


def _measure_round(model: EmbeddingModel, thumbnails: list[bytes]) -> dict[str, float]:
    return {
        "model_only": model_only_images_per_second(model, thumbnails),
        "embed_stage": embed_stage_images_per_second(model, thumbnails),
    }


def _reference_worker(args: argparse.Namespace) -> None:
    """Builds the pinned reference in this fresh process; one JSON line per `round` line on stdin."""
    model = load_model(reference_settings(args.model))
    if malloc_tuning_applied():  # the reference must run with the process's malloc as it comes
        raise SystemExit("the pinned reference process has a tuned malloc")
    thumbnails = _thumbnails(args, args.images)
    print(json.dumps({"ready": True, "torch_threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        print(json.dumps(_measure_round(model, thumbnails)), flush=True)


class _ReferenceProcess:
    """The pinned reference in a subprocess (so nothing this process tuned applies to it), a round at a time."""

    def __init__(self, args: argparse.Namespace, images: int) -> None:
        command = [sys.executable, "-m", "imgemb_assets.core.embedding_bench", "--reference-worker",
                   "--model", args.model, "--images", str(images)]  # fmt: skip
        if args.corpus:
            command += ["--corpus", str(args.corpus)]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.torch_threads = int(self._read()["torch_threads"])

    def round(self) -> dict[str, float]:
        assert self._process.stdin is not None
        self._process.stdin.write("round\n")
        self._process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._process.wait(timeout=60)

    def _read(self) -> dict[str, float]:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise SystemExit(f"the reference subprocess exited with {self._process.wait()}")
        return json.loads(line)


def _print_rounds(label: str, rounds: list[dict[str, float]]) -> None:
    for kind in ("model_only", "embed_stage"):
        values = "  ".join(f"{r[kind]:9.1f}" for r in rounds)
        print(f"{label + ' ' + kind.replace('_', '-'):36s}{values:>40s}")


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = _parser().parse_args(argv)
    if args.reference_worker:
        _reference_worker(args)
        return {}
    images = max(args.images, 64)
    if args.reference:
        reference = _ReferenceProcess(args, images)
        rounds = [reference.round() for _ in range(args.rounds)]
        reference.close()
        summary_ref: dict[str, object] = {
            "reference": "torchvision eager fp32 batch 64, default threads, untouched malloc, fresh process",
            "model": args.model, "images": images, "torch_threads": reference.torch_threads,
            "model_only_img_s": round(max(r["model_only"] for r in rounds), 2),
            "embed_stage_img_s": round(max(r["embed_stage"] for r in rounds), 2),
        }  # fmt: skip
        _print_rounds("reference", rounds)
        print(json.dumps(summary_ref))
        return summary_ref
    settings = EmbeddingSettings(
        weights="random", device=args.device, batch_size=args.batch_size, model=args.model,
        precision=args.precision, compile=args.compile, runtime=args.runtime, decoder=args.decoder,
    )  # fmt: skip
    started = time.perf_counter()
    model = load_model(settings)
    load_seconds = time.perf_counter() - started
    images = max(images, model.batch_size)
    # The reference is a CPU baseline: it is measured when the model runs on CPU.
    alongside = _ReferenceProcess(args, images) if model.device.type == "cpu" and not args.no_reference else None
    thumbnails = _thumbnails(args, images)
    ours, theirs = [], []
    for _round in range(args.rounds):
        ours.append(_measure_round(model, thumbnails))
        if alongside is not None:
            theirs.append(alongside.round())
    if alongside is not None:
        alongside.close()
    model_only = max(r["model_only"] for r in ours)
    embed_stage = max(r["embed_stage"] for r in ours)
    summary: dict[str, object] = {
        "device": str(model.device) if model.device.type == "cpu" else torch.cuda.get_device_name(model.device),
        "precision": str(model.dtype).removeprefix("torch."),
        "model": args.model,
        "runtime": model.runtime,
        "malloc_tuned": malloc_tuning_applied(),
        "load_s": round(load_seconds, 2),
        "batch_size": model.batch_size,
        "images": images,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "model_only_img_s": round(model_only, 2),
        "embed_stage_img_s": round(embed_stage, 2),
        "ratio": round(embed_stage / model_only, 3),
        "thumbnail_kb": round(float(np.mean([len(t) for t in thumbnails])) / 1024, 1),
        **model.runtime_metadata(),
    }
    if theirs:
        reference_model_only = max(r["model_only"] for r in theirs)
        reference_embed_stage = max(r["embed_stage"] for r in theirs)
        summary |= {
            "reference_model_only_img_s": round(reference_model_only, 2),
            "reference_embed_stage_img_s": round(reference_embed_stage, 2),
            "model_only_vs_reference": round(model_only / reference_model_only, 2),
            "embed_stage_vs_reference": round(embed_stage / reference_embed_stage, 2),
        }
    print(f"{'':36s}{'img/s per round':>40s}")
    _print_rounds(model.runtime, ours)
    if theirs:
        _print_rounds("reference", theirs)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
