"""What the JPEG draft decode changes: thumbnails, vectors and decode time, draft against full-size decode.

    python -m bench.draft_decode --corpus DIR [--limit 200] [--rounds 3] [--batch-size 16] [--device cpu]

DIR is any folder of photos (e.g. a corpus made by `../shared/corpus/make_corpus.py`);
its JPEG files (by content) are read in sorted order, up to `--limit`. Each photo is
downscaled twice by the pipeline's own `downscale`:

- draft (the default): Pillow's `draft("RGB", (224, 224))` decodes a JPEG of at least
  448 px on both sides at 1/2, 1/4 or 1/8 scale in the DCT domain, then the bilinear
  resize to 224x224;
- full size (`full_size_jpeg_decode=True`): the whole JPEG decoded, then the same
  resize: the article's pixels.

Prints, over all photos and per draft scale: the mean and max (over photos) of the
mean absolute difference of the two stored thumbnails in grey levels (0-255, all
channels), the relative difference |v_draft - v_full| / |v_full| of their ResNet50
vectors (random weights, seed 0, fp32 on the chosen device, through
`embed_thumbnails` as the embedding step runs it), the same relative distance from each
full-size vector to its nearest other photo's (the scale the difference should be
read against), whether each photo's nearest neighbour (cosine) is the same photo under
both decodes, and the decode time of each: the whole `downscale` call (decode,
orientation, RGB, resize, JPEG encode), best of `--rounds`, the two decodes of one
photo run back to back so both see the same machine. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import print_summary
from imgemb_assets.core.embedding.inference import embed_thumbnails
from imgemb_assets.core.embedding.model_settings import EmbeddingSettings
from imgemb_assets.core.embedding.models import load_model
from imgemb_assets.core.imaging.images import IMAGE_SIZE, ImageRejected, decode_thumbnail, downscale


def jpeg_files(folder: Path, limit: int) -> list[tuple[Path, bytes]]:
    """The JPEGs (by content) under `folder`, sorted by path, at most `limit`."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if data.startswith(b"\xff\xd8\xff"):
            found.append((path, data))
            if len(found) == limit:
                break
    if not found:
        raise SystemExit(f"no JPEG files under {folder}")
    return found


def draft_scale(data: bytes) -> int:
    """The scale Pillow's draft decodes this JPEG at (1: full size), as `JpegImageFile.draft` picks it."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    scale = min(width // IMAGE_SIZE, height // IMAGE_SIZE)
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def timed_thumbnail(data: bytes, full_size: bool, rounds: int) -> tuple[bytes, float]:
    """The stored thumbnail and the best time of `rounds` calls to `downscale`."""
    best, jpeg = float("inf"), b""
    for _ in range(rounds):
        start = time.perf_counter()
        jpeg = downscale(data, full_size_jpeg_decode=full_size).jpeg
        best = min(best, time.perf_counter() - start)
    return jpeg, best


def _stats(values: list[float], digits: int = 3) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "max": float("nan")}
    return {"mean": round(statistics.fmean(values), digits), "max": round(max(values), digits)}


def _worst(rows: list[dict[str, object]], relative: np.ndarray, corpus: Path) -> list[object]:
    index = int(np.argmax(relative))
    row = rows[index]
    width, height = row["size"]  # type: ignore[misc]
    path = Path(str(row["path"]))
    grey = round(float(row["grey_mean"]), 2)  # type: ignore[arg-type]
    return [str(path.relative_to(corpus)), f"{width}x{height}", grey, round(float(relative[index]), 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    photos = jpeg_files(args.corpus, args.limit)
    rows = []
    for path, data in photos:
        try:
            # Alternating which decode goes first, so neither always runs on a warm cache.
            if len(rows) % 2:
                draft_jpeg, draft_s = timed_thumbnail(data, False, args.rounds)
                full_jpeg, full_s = timed_thumbnail(data, True, args.rounds)
            else:
                full_jpeg, full_s = timed_thumbnail(data, True, args.rounds)
                draft_jpeg, draft_s = timed_thumbnail(data, False, args.rounds)
        except ImageRejected as rejected:
            print(f"skipped {path}: {rejected.reason}")
            continue
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
        grey = np.abs(decode_thumbnail(draft_jpeg).astype(np.int16) - decode_thumbnail(full_jpeg).astype(np.int16))
        rows.append(
            {
                "path": path,
                "size": size,
                "scale": draft_scale(data),
                "grey_mean": float(grey.mean()),
                "grey_max": int(grey.max()),
                "draft_s": draft_s,
                "full_s": full_s,
                "draft_jpeg": draft_jpeg,
                "full_jpeg": full_jpeg,
            }
        )

    settings = EmbeddingSettings(weights="random:0", device=args.device, batch_size=args.batch_size, precision="fp32")
    model = load_model(settings)
    started = time.perf_counter()
    draft_vectors = embed_thumbnails(model, [row["draft_jpeg"] for row in rows]).astype(np.float64)
    full_vectors = embed_thumbnails(model, [row["full_jpeg"] for row in rows]).astype(np.float64)
    embed_s = time.perf_counter() - started
    full_norms = np.linalg.norm(full_vectors, axis=1)
    relative = np.linalg.norm(draft_vectors - full_vectors, axis=1) / full_norms
    # The scale to read `relative` against: how far each photo's vector is from its nearest other photo's.
    distances = np.linalg.norm(full_vectors[:, None, :] - full_vectors[None, :, :], axis=2)
    np.fill_diagonal(distances, np.inf)
    nearest_other = distances.min(axis=1) / full_norms
    # Does a photo's nearest neighbour stay the same photo? Cosine, draft vector against full-size vectors
    # (and the other way round), itself included: agreement 1.0 means every draft vector is nearest its own full one.
    unit_draft = draft_vectors / np.linalg.norm(draft_vectors, axis=1, keepdims=True)
    unit_full = full_vectors / full_norms[:, None]
    self_match = float(np.mean(np.argmax(unit_draft @ unit_full.T, axis=1) == np.arange(len(rows))))
    cosine_to_full = np.sum(unit_draft * unit_full, axis=1)
    # Nearest other photo (itself excluded), within each decode: the same one?
    within_draft, within_full = unit_draft @ unit_draft.T, unit_full @ unit_full.T
    np.fill_diagonal(within_draft, -np.inf)
    np.fill_diagonal(within_full, -np.inf)
    same_neighbour = float(np.mean(np.argmax(within_draft, axis=1) == np.argmax(within_full, axis=1)))

    summary: dict[str, object] = {
        "photos": len(rows),
        "drafted (decoded below full size)": sum(row["scale"] > 1 for row in rows),
        "median size": f"{int(np.median([max(r['size']) for r in rows]))} px long side",
        "grey levels |draft - full|, per-photo mean: all": _stats([r["grey_mean"] for r in rows]),
        "grey levels, drafted photos only": _stats([r["grey_mean"] for r in rows if r["scale"] > 1]),
        "grey levels, largest single pixel difference": max(r["grey_max"] for r in rows),
        "vector |v_draft - v_full| / |v_full|: all": _stats(relative.tolist(), 4),
        "vector relative difference, drafted only": _stats(
            [float(v) for v, r in zip(relative, rows) if r["scale"] > 1], 4
        ),
        "vector cosine draft vs full (min)": round(float(cosine_to_full.min()), 5),
        "nearest other photo's vector, relative distance (median, min)": [
            round(float(np.median(nearest_other)), 4),
            round(float(nearest_other.min()), 4),
        ],
        "draft vector nearest its own full-size vector (fraction)": self_match,
        "nearest other photo the same under both decodes (fraction)": round(same_neighbour, 4),
        "downscale seconds per photo, draft (mean)": round(statistics.fmean(r["draft_s"] for r in rows), 5),
        "downscale seconds per photo, full size (mean)": round(statistics.fmean(r["full_s"] for r in rows), 5),
        "full-size / draft time (total)": round(sum(r["full_s"] for r in rows) / sum(r["draft_s"] for r in rows), 2),
        "largest vector difference (photo, size, grey, relative)": _worst(rows, relative, args.corpus),
        "embedding seconds (both sets)": round(embed_s, 1),
        "model": model.model_id,
    }
    for scale in (2, 4, 8):
        picked = [(r, float(v)) for r, v in zip(rows, relative) if r["scale"] == scale]
        if not picked:
            continue
        summary[f"scale 1/{scale}"] = {
            "photos": len(picked),
            "grey mean/max": _stats([r["grey_mean"] for r, _ in picked]),
            "vector relative mean/max": _stats([v for _, v in picked], 4),
            "full/draft time": round(sum(r["full_s"] for r, _ in picked) / sum(r["draft_s"] for r, _ in picked), 2),
        }
    print_summary(summary)


if __name__ == "__main__":
    main()
