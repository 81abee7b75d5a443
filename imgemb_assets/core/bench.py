"""Embedding throughput, model alone against the whole embed stage, side by side in one run.

    python -m imgemb_assets.core.bench [--model resnet50] [--device auto] [--precision auto]
                                       [--batch-size N] [--images 512] [--rounds 3] [--corpus DIR]

model-only: the same thumbnails, decoded and preprocessed beforehand and already
on the device, through forward passes only.
embed-stage: `embed_thumbnails` on real 224x224 JPEG thumbnails held in memory
(decode, copy, normalize, forward, copy back), as the embedding asset runs it.
Rounds alternate between the two and the best of each is kept, so both see the
same machine. Thumbnails come from `--corpus` (any folder of photos, e.g. the
shared benchmark corpus) or, without it, from the generated sample images.
Random-initialised weights: throughput does not depend on them. Ends with one
JSON line. Needs torch, numpy and Pillow only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from imgemb_assets.core.embedding import decode_batch, embed_thumbnails, preprocess
from imgemb_assets.core.images import ImageRejected, downscale
from imgemb_assets.core.model_config import BACKBONES, PRECISIONS, EmbeddingSettings
from imgemb_assets.core.models import EmbeddingModel, load_model
from imgemb_assets.core.synthetic import synthetic_photo


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
    batches = [
        preprocess(decode_batch(thumbnails[start : start + model.batch_size]).to(model.device), model.dtype)
        for start in range(0, len(thumbnails), model.batch_size)
    ]
    with torch.inference_mode():
        model.module(batches[0])  # warm-up
        _synchronize(model.device)
        started = time.perf_counter()
        for batch in batches:
            model.module(batch)
        _synchronize(model.device)
    return len(thumbnails) / (time.perf_counter() - started)


def embed_stage_images_per_second(model: EmbeddingModel, thumbnails: list[bytes]) -> float:
    embed_thumbnails(model, thumbnails[: model.batch_size])  # warm-up
    started = time.perf_counter()
    embed_thumbnails(model, thumbnails)  # returns host arrays, so it is synchronized
    return len(thumbnails) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=BACKBONES, default="resnet50")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--images", type=int, default=512, help="images per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--corpus", type=Path, default=None, help="folder of photos to make thumbnails from")
    args = parser.parse_args(argv)
    settings = EmbeddingSettings(
        weights="random", device=args.device, batch_size=args.batch_size, model=args.model,
        precision=args.precision, compile=args.compile,
    )  # fmt: skip
    model = load_model(settings)
    images = max(args.images, model.batch_size)
    thumbnails = thumbnails_from(args.corpus, images) if args.corpus else generated_thumbnails(images)
    model_only, embed_stage = [], []
    for _round in range(args.rounds):
        model_only.append(model_only_images_per_second(model, thumbnails))
        embed_stage.append(embed_stage_images_per_second(model, thumbnails))
    summary: dict[str, object] = {
        "device": str(model.device) if model.device.type == "cpu" else torch.cuda.get_device_name(model.device),
        "precision": str(model.dtype).removeprefix("torch."),
        "model": args.model,
        "batch_size": model.batch_size,
        "images": images,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "model_only_img_s": round(max(model_only), 2),
        "embed_stage_img_s": round(max(embed_stage), 2),
        "ratio": round(max(embed_stage) / max(model_only), 3),
        "thumbnail_kb": round(float(np.mean([len(t) for t in thumbnails])) / 1024, 1),
    }
    print(f"{'':24s}{'img/s per round':>40s}")
    print(f"{'model only':24s}{'  '.join(f'{v:9.1f}' for v in model_only):>40s}")
    print(f"{'embed stage':24s}{'  '.join(f'{v:9.1f}' for v in embed_stage):>40s}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
