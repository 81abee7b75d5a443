"""Embedding throughput, model alone against the whole embed stage, side by side in one run.

    python -m imgemb_assets.core.embedding_bench [--model resnet50 [--model clip_vit_b_32 ...]]
                                       [--device auto] [--precision auto]
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

`--model` given more than once measures each backbone on the same thumbnails, their
rounds interleaved (so a loaded machine slows all alike), and prints them side by
side, e.g. a CLIP's image tower beside ResNet50:

    python -m imgemb_assets.core.embedding_bench --model resnet50 --model clip_vit_b_32

The JSON line then holds one summary per model under "models".

The pinned CPU reference: the library's eager module (torchvision's, open_clip's for
a CLIP), fp32, batch 64, torch's default threads, in a fresh process whose malloc is
untouched (runtime `eager`), for each model measured. On
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
from imgemb_assets.core.embedding.backbones.specs import BACKBONE_SPECS, BACKBONES
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


DEFAULT_MODEL = "resnet50"


def reference_settings(model: str) -> EmbeddingSettings:
    """The pinned CPU reference: eager fp32, batch 64, no allocator tuning. Never change it."""
    return EmbeddingSettings(
        weights="random", device="cpu", batch_size=64, model=model, precision="fp32", runtime="eager"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--model",
        choices=BACKBONES,
        action="append",
        help=f"a backbone to measure; give it again to measure several side by side (default {DEFAULT_MODEL})",
    )
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


def _reference_worker(args: argparse.Namespace, name: str) -> None:
    """Builds the pinned reference in this fresh process; one JSON line per `round` line on stdin."""
    model = load_model(reference_settings(name))
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

    def __init__(self, args: argparse.Namespace, model: str, images: int) -> None:
        command = [sys.executable, "-m", "imgemb_assets.core.embedding_bench", "--reference-worker",
                   "--model", model, "--images", str(images)]  # fmt: skip
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


class _ModelBench:
    """One backbone as configured, with its pinned reference alongside on CPU; measured a round at a time."""

    def __init__(self, args: argparse.Namespace, name: str, images: int) -> None:
        self.name = name
        settings = EmbeddingSettings(
            weights="random", device=args.device, batch_size=args.batch_size, model=name,
            precision=args.precision, compile=args.compile, runtime=args.runtime, decoder=args.decoder,
        )  # fmt: skip
        started = time.perf_counter()
        self.model = load_model(settings)
        self.load_seconds = time.perf_counter() - started
        self.images = max(images, self.model.batch_size)
        # The reference is a CPU baseline: it is measured when the model runs on CPU.
        on_cpu = self.model.device.type == "cpu" and not args.no_reference
        self.alongside = _ReferenceProcess(args, name, self.images) if on_cpu else None
        self.thumbnails = _thumbnails(args, self.images)
        self.rounds = args.rounds
        self.ours: list[dict[str, float]] = []
        self.theirs: list[dict[str, float]] = []

    def round(self) -> None:
        self.ours.append(_measure_round(self.model, self.thumbnails))
        if self.alongside is not None:
            self.theirs.append(self.alongside.round())

    def close(self) -> None:
        if self.alongside is not None:
            self.alongside.close()

    def summary(self) -> dict[str, object]:
        model = self.model
        model_only = max(r["model_only"] for r in self.ours)
        embed_stage = max(r["embed_stage"] for r in self.ours)
        summary: dict[str, object] = {
            "device": str(model.device) if model.device.type == "cpu" else torch.cuda.get_device_name(model.device),
            "precision": str(model.dtype).removeprefix("torch."),
            "model": self.name,
            "runtime": model.runtime,
            "malloc_tuned": malloc_tuning_applied(),
            "load_s": round(self.load_seconds, 2),
            "batch_size": model.batch_size,
            "images": self.images,
            "rounds": self.rounds,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "model_only_img_s": round(model_only, 2),
            "embed_stage_img_s": round(embed_stage, 2),
            "ratio": round(embed_stage / model_only, 3),
            "thumbnail_kb": round(float(np.mean([len(t) for t in self.thumbnails])) / 1024, 1),
            **model.runtime_metadata(),
        }
        if self.theirs:
            reference_model_only = max(r["model_only"] for r in self.theirs)
            reference_embed_stage = max(r["embed_stage"] for r in self.theirs)
            summary |= {
                "reference_model_only_img_s": round(reference_model_only, 2),
                "reference_embed_stage_img_s": round(reference_embed_stage, 2),
                "model_only_vs_reference": round(model_only / reference_model_only, 2),
                "embed_stage_vs_reference": round(embed_stage / reference_embed_stage, 2),
            }
        return summary


def _reference_only(args: argparse.Namespace, name: str, images: int) -> dict[str, object]:
    reference = _ReferenceProcess(args, name, images)
    rounds = [reference.round() for _ in range(args.rounds)]
    reference.close()
    _print_rounds("reference" if len(args.model or ()) <= 1 else f"{name} reference", rounds)
    return {
        "reference": f"{BACKBONE_SPECS[name].library} eager fp32 batch 64, default threads, untouched malloc, fresh process",
        "model": name, "images": images, "torch_threads": reference.torch_threads,
        "model_only_img_s": round(max(r["model_only"] for r in rounds), 2),
        "embed_stage_img_s": round(max(r["embed_stage"] for r in rounds), 2),
    }  # fmt: skip


def side_by_side(summaries: list[dict[str, object]]) -> list[str]:
    """One line per model: its images/s model-only and embed-stage, and the reference's where measured."""
    lines = [f"{'model':16s}{'width':>7s}{'batch':>7s}{'model-only':>12s}{'embed-stage':>13s}{'ratio':>7s}"
             f"{'ref model-only':>16s}{'ref embed-stage':>17s}"]  # fmt: skip
    for summary in summaries:
        reference = [summary.get("reference_model_only_img_s"), summary.get("reference_embed_stage_img_s")]
        shown = [f"{value:.1f}" if isinstance(value, float) else "-" for value in reference]
        lines.append(
            f"{summary['model']!s:16s}{summary.get('embedding_width', '-')!s:>7s}{summary['batch_size']!s:>7s}"
            f"{summary['model_only_img_s']:>12.1f}{summary['embed_stage_img_s']:>13.1f}{summary['ratio']:>7.2f}"
            f"{shown[0]:>16s}{shown[1]:>17s}"
        )
    return lines


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = _parser().parse_args(argv)
    names = list(dict.fromkeys(args.model or [DEFAULT_MODEL]))
    if args.reference_worker:
        _reference_worker(args, names[0])
        return {}
    images = max(args.images, 64)
    if args.reference:
        summaries = [_reference_only(args, name, images) for name in names]
        return _print_summaries(summaries)
    benches = [_ModelBench(args, name, images) for name in names]
    for _round in range(args.rounds):
        for bench in benches:  # interleaved: a machine that slows down mid-run slows every model alike
            bench.round()
    for bench in benches:
        bench.close()
    print(f"{'':36s}{'img/s per round':>40s}")
    several = len(benches) > 1
    for bench in benches:
        label = f"{bench.name} {bench.model.runtime}" if several else bench.model.runtime
        _print_rounds(label, bench.ours)
        if bench.theirs:
            _print_rounds(f"{bench.name} reference" if several else "reference", bench.theirs)
    summaries = [bench.summary() | ({"embedding_width": bench.model.width} if several else {}) for bench in benches]
    if several:
        print()
        print("\n".join(side_by_side(summaries)))
    return _print_summaries(summaries)


def _print_summaries(summaries: list[dict[str, object]]) -> dict[str, object]:
    """The one JSON line that ends the output: the summary of one model, or {"models": [...]} for several."""
    result: dict[str, object] = summaries[0] if len(summaries) == 1 else {"models": summaries}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
