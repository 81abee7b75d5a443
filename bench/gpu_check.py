"""GPU check: correctness against the fp32 reference, then the throughput table. Under 4 minutes.

    python bench/gpu_check.py [--corpus DIR]        (from the repository root, on a CUDA machine)

Needs torch, torchvision, numpy and Pillow only: no Dagster, deltalake, polars
or pyarrow (the project's `core` embedding path is importable without them).

1. Correctness: embeddings of real thumbnails through the project's CUDA path
   (nvJPEG decode, fp16 or bf16, channels_last) against the article's fp32
   computation (Pillow decode, per-image ToTensor + Normalize, fp32 model) with
   the same random-initialised weights; relative error must be <= 2e-3.
2. Throughput: model-only and embed-stage images/s at fp16 (and bf16), and their
   ratio, from `imgemb_assets.core.embedding_bench`; the embed stage should reach 0.85x.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

from imgemb_assets.core import embedding_bench as bench  # noqa: E402
from imgemb_assets.core.embedding import embed_thumbnails  # noqa: E402
from imgemb_assets.core.model_settings import EmbeddingSettings  # noqa: E402
from imgemb_assets.core.models import IMAGENET_NORMALIZATION, load_model  # noqa: E402

RELATIVE_TOLERANCE = 2e-3
TARGET_RATIO = 0.85


def reference_embeddings(jpegs: list[bytes]) -> np.ndarray:
    """The article's computation in fp32 on CPU, per image."""
    model = load_model(EmbeddingSettings(weights="random", device="cpu", precision="fp32", runtime="eager"))
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_NORMALIZATION.mean, IMAGENET_NORMALIZATION.std)])
    with torch.inference_mode():
        return np.stack([model.module(transform(Image.open(io.BytesIO(j)).convert("RGB"))[None])[0].numpy() for j in jpegs])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=None)
    parser.add_argument("--images", type=int, default=4096)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    jpegs = bench.thumbnails_from(args.corpus, 64) if args.corpus else bench.generated_thumbnails(64)
    expected = reference_embeddings(jpegs)
    results, failed = [], False
    for precision in ("fp16", "bf16"):
        model = load_model(EmbeddingSettings(weights="random", device="cuda", precision=precision))
        got = embed_thumbnails(model, jpegs)
        error = float(np.abs(got - expected).max() / np.abs(expected).max())
        # What search sees: the cosine similarity of each vector to its fp32 counterpart.
        cosine = np.sum(got * expected, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
        ok = error <= RELATIVE_TOLERANCE
        failed |= not ok
        print(
            f"correctness {precision}: max relative error {error:.2e} ({'ok' if ok else 'FAIL'} <= {RELATIVE_TOLERANCE}),"
            f" lowest cosine to fp32 {float(cosine.min()):.6f}"
        )
        argv = ["--device", "cuda", "--precision", precision, "--images", str(args.images), "--rounds", "3"]
        if args.corpus:
            argv += ["--corpus", str(args.corpus)]
        summary = bench.main(argv)
        summary["max_relative_error"] = error
        summary["min_cosine_to_fp32"] = float(cosine.min())
        results.append(summary)
    print(f"\n{'precision':10s}{'model only img/s':>18s}{'embed stage img/s':>19s}{'ratio':>8s}")
    for summary in results:
        print(
            f"{summary['precision']:10s}{summary['model_only_img_s']:>18}{summary['embed_stage_img_s']:>19}"
            f"{summary['ratio']:>8}"
        )
    fp16 = results[0]
    failed |= float(fp16["ratio"]) < TARGET_RATIO  # type: ignore[arg-type]
    print(json.dumps({"checks_passed": not failed, "results": results}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
