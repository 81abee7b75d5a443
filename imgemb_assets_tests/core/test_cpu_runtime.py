"""The default CPU runtime: same vectors as torchvision eager fp32, malloc tuned only where it is asked for."""

from __future__ import annotations

import io
import json
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.models import resnet50

from imgemb_assets.core.embedding.allocator import keep_inference_memory_mapped
from imgemb_assets.core.embedding.inference import decode_batch, embed_thumbnails, preprocess
from imgemb_assets.core.embedding.model_settings import EmbeddingSettings, ModelConfigError
from imgemb_assets.core.embedding.models import load_model, resolve_runtime
from imgemb_assets.core.imaging.images import downscale
from imgemb_assets.core.imaging.synthetic import synthetic_photo

SEED = 5
GLIBC = platform.libc_ver()[0] == "glibc"  # the tuning exists only there


@pytest.fixture(scope="module")
def photo_thumbnails() -> list[bytes]:
    """Stored-format thumbnails of synthetic photos (gradients and shapes, not noise), varied sizes."""
    rng = np.random.default_rng(11)
    out = []
    for width, height in [(640, 480), (300, 900), (224, 224), (1000, 260), (120, 90), (500, 500)]:
        buffer = io.BytesIO()
        synthetic_photo(rng, width, height).save(buffer, format="JPEG", quality=90)
        out.append(downscale(buffer.getvalue()).jpeg)
    return out


def _torchvision_eager(state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """torchvision's resnet50 built independently of the project, headless, fp32 eager."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        module = resnet50(weights=None)
    module.fc = torch.nn.Identity()
    if state is not None:
        module.load_state_dict(state)
    return module.eval()


def _recalibrated_state(module: torch.nn.Module, thumbnails: list[bytes]) -> dict[str, torch.Tensor]:
    # Random weights with BN's default running stats (mean 0, var 1) give
    # activations that grow block after block; re-estimating the running stats
    # on the thumbnails gives normalised activations, as trained weights do,
    # where small differences in arithmetic show up relatively larger.
    calibrated = _torchvision_eager(module.state_dict())
    for layer in calibrated.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average
    calibrated.train()
    with torch.no_grad():
        calibrated(preprocess(decode_batch(thumbnails)))
    return calibrated.eval().state_dict()


def _max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float((np.linalg.norm(actual - expected, axis=1) / np.linalg.norm(expected, axis=1)).max())


def test_the_default_cpu_runtime_is_the_tuned_one_and_eager_stays_choosable() -> None:
    assert EmbeddingSettings(weights="random").runtime == "auto"
    assert resolve_runtime("auto", torch.device("cpu")) == "cpu-tuned"
    assert resolve_runtime("eager", torch.device("cpu")) == "eager"
    # CUDA keeps its own path whatever is asked.
    assert resolve_runtime("auto", torch.device("cuda")) == "eager"
    assert resolve_runtime("cpu-tuned", torch.device("cuda:1")) == "eager"
    with pytest.raises(ModelConfigError, match="unknown runtime 'onnx'"):
        EmbeddingSettings(weights="random", runtime="onnx")


@pytest.mark.parametrize("weights", ["random", "recalibrated-bn"])
def test_default_cpu_runtime_matches_torchvision_eager_within_1e_5(photo_thumbnails: list[bytes], weights: str) -> None:
    model = load_model(EmbeddingSettings(weights=f"random:{SEED}", device="cpu"))
    assert model.runtime == "cpu-tuned"
    reference = _torchvision_eager(model.module.state_dict())
    if weights == "recalibrated-bn":
        state = _recalibrated_state(reference, photo_thumbnails)
        model.module.load_state_dict(state)
        reference.load_state_dict(state)
    with torch.inference_mode():
        expected = reference(preprocess(decode_batch(photo_thumbnails))).numpy()
    ours = embed_thumbnails(model, photo_thumbnails)
    assert np.abs(expected).max() > 0
    assert _max_relative_error(ours, expected) <= 1e-5


def test_malloc_tuning_is_idempotent() -> None:
    first = keep_inference_memory_mapped()
    assert keep_inference_memory_mapped() == first
    assert first is GLIBC


_PROBE = """
import json, sys
from imgemb_assets.core.embedding.allocator import malloc_tuning_applied
from imgemb_assets.core.embedding.model_settings import EmbeddingSettings
from imgemb_assets.core.embedding.models import load_model
before = malloc_tuning_applied()
model = load_model(EmbeddingSettings(weights="random", model="resnet18", device="cpu", runtime=sys.argv[1]))
print(json.dumps({"before": before, "after": malloc_tuning_applied(), "runtime": model.runtime}))
"""


@pytest.mark.parametrize(("runtime", "tuned"), [("eager", False), ("auto", True)])
def test_malloc_is_tuned_when_a_cpu_tuned_model_is_built_and_never_for_eager(runtime: str, tuned: bool) -> None:
    # A fresh process each: the tuning is process-wide, and this one may already have it.
    done = subprocess.run([sys.executable, "-c", _PROBE, runtime], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["before"] is False  # importing the project tunes nothing
    assert report["after"] is (tuned and GLIBC)
    assert report["runtime"] == ("cpu-tuned" if tuned else "eager")


_RELEASE_PROBE = """
import json, resource
import torch
from imgemb_assets.core.embedding.allocator import keep_inference_memory_mapped, release_free_heap

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

keep_inference_memory_mapped()
buffers = [torch.ones(64, 2**20 // 4) for _ in range(6)]  # 6 x 64 MiB, on the heap (no mmap)
del buffers
below_threshold = release_free_heap(kept_free_bytes=1 << 30)  # 384 MiB free: kept for the next batches
kept = rss_mb()
released = release_free_heap(kept_free_bytes=256 << 20)
print(json.dumps({"kept": kept, "after": rss_mb(), "released": released, "below_threshold": below_threshold}))
"""


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_the_free_heap_is_given_back_between_partitions() -> None:
    """Under the tuning nothing is returned on its own; release_free_heap bounds a long step's memory."""
    done = subprocess.run([sys.executable, "-c", _RELEASE_PROBE], capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["below_threshold"] is False, "less free heap than the threshold is kept"
    assert report["released"] is True
    assert report["kept"] - report["after"] > 300, report  # most of the 384 MiB freed above
