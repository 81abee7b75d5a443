"""The compiled model: when it is on, the fixed batch shape (padding a partial batch), its fallbacks, its vectors.

CUDA graphs cannot be captured here, so this is what a CPU shows of it: the
default per device, the padding (the real rows' vectors are the unpadded ones),
a real torch.compile of a real backbone on CPU (inductor; within the CPU
path's 1e-5 of eager), the lazy start that keeps a small call eager, and a real
compile failure (dynamo refusing a data-dependent branch under fullgraph).
Compile seconds and images/s on a GPU are measured by bench/gpu_check.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgemb_assets.core.embedding.inference import decode_batch, embed_thumbnails, forward_for, pad_batch, run_model
from imgemb_assets.core.embedding.model_settings import EmbeddingSettings, ModelConfigError
from imgemb_assets.core.embedding.models import (
    COMPILE_MODES,
    CompiledForward,
    load_model,
    model_id_for,
    resolve_compile,
)
from imgemb_assets.core.embedding_bench import generated_thumbnails

CPU = torch.device("cpu")
RESNET18 = dict(weights="random:3", model="resnet18", device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def thumbnails() -> list[bytes]:
    return generated_thumbnails(6, distinct=6)


def _max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_compile_is_on_by_default_for_cuda_only_and_obeyed_when_set() -> None:
    assert EmbeddingSettings(weights="random").compile is None
    assert resolve_compile(None, torch.device("cuda")) is True
    assert resolve_compile(None, torch.device("cuda:1")) is True
    assert resolve_compile(None, CPU) is False
    assert resolve_compile(True, CPU) is True
    assert resolve_compile(False, torch.device("cuda")) is False
    assert COMPILE_MODES["cuda"] == "reduce-overhead"  # CUDA graphs for the fixed batch shape


def test_model_id_does_not_depend_on_compile_or_decoder() -> None:
    ids = {
        model_id_for(EmbeddingSettings(weights="random", device="cpu", compile=compile_setting, decoder=decoder))
        for compile_setting in (None, True, False)
        for decoder in ("auto", "pillow")
    }
    assert ids == {"torchvision/resnet50/random-seed0/fp32"}


def test_pad_batch_appends_zero_rows_up_to_the_batch_shape(thumbnails: list[bytes]) -> None:
    pixels = decode_batch(thumbnails[:3])
    padded = pad_batch(pixels, 8)
    assert tuple(padded.shape) == (8, 3, 224, 224)
    assert torch.equal(padded[:3], pixels)
    assert int(padded[3:].abs().max()) == 0
    assert pad_batch(pixels, 3) is pixels


def test_padding_rows_leave_the_real_rows_vectors_as_they_were(thumbnails: list[bytes]) -> None:
    model = load_model(EmbeddingSettings(**RESNET18))
    pixels = decode_batch(thumbnails[:3])
    alone = run_model(model, pixels).numpy()
    padded = run_model(model, pad_batch(pixels, 16)).numpy()
    assert padded.shape == (16, 512)
    assert _max_relative_error(padded[:3], alone) <= 1e-5


def test_the_compiled_forward_takes_only_its_batch_shape() -> None:
    compiled = CompiledForward(torch.nn.Flatten(), batch_size=4, device=CPU, required=True)
    with pytest.raises(ValueError, match="batches of 4 rows, not 3"):
        compiled(torch.zeros(3, 2))


@pytest.mark.slow  # inductor's first C++ build here: about 20 s on 2 cores with an empty cache
def test_a_compiled_cpu_model_pads_its_last_batch_and_matches_eager(thumbnails: list[bytes]) -> None:
    eager = embed_thumbnails(load_model(EmbeddingSettings(**RESNET18)), thumbnails)
    model = load_model(EmbeddingSettings(**RESNET18, compile=True))
    assert model.compiled is not None and model.compiled.mode == "default"

    # Fewer images than a batch: not worth a compile, so the call stays eager.
    first = embed_thumbnails(model, thumbnails[:1])
    assert model.compiled.compile_seconds is None
    assert model.runtime_metadata()["compiled"] is False
    assert _max_relative_error(first, eager[:1]) <= 1e-5

    # A recompile would raise: zero-pixel warm-up, full batches of Pillow's NHWC views and
    # padded ones all reach the compiled graph in one layout.
    with torch._dynamo.config.patch(error_on_recompile=True):
        # The compile happens when the call's forward is chosen, before any decode thread starts.
        forward_for(model, len(thumbnails))
        assert model.compiled.compile_seconds is not None and model.compiled.compile_seconds > 0
        assert model.compiled.failure is None
        # 6 images at batch 4: the second batch holds 2 and is padded (the compiled
        # forward refuses any other shape), its padding rows dropped.
        vectors = embed_thumbnails(model, thumbnails)
        # Once compiled, a single image goes through it too, padded to the batch.
        again = embed_thumbnails(model, thumbnails[5:])
    ran = model.runtime_metadata()
    assert (ran["compiled"], ran["compile_mode"], ran["compile_failure"]) == (True, "default", None)
    assert isinstance(ran["compile_s"], float) and ran["compile_s"] > 0
    assert vectors.shape == eager.shape
    assert _max_relative_error(vectors, eager) <= 1e-5
    assert _max_relative_error(again, eager[5:]) <= 1e-5


class _DataDependentBranch(torch.nn.Module):
    """Branches on a tensor's value: dynamo must break the graph there, which fullgraph refuses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x.flatten(1) * 2
        return x.flatten(1)


def test_a_compile_that_fails_falls_back_to_eager_under_the_default() -> None:
    batch = torch.ones(2, 3)
    compiled = CompiledForward(_DataDependentBranch(), batch_size=2, device=CPU, required=False)
    assert compiled.worth_using(2)
    out = compiled(batch)
    assert torch.equal(out, batch * 2)
    assert compiled.failure is not None
    assert compiled.compile_seconds is None
    assert not compiled.worth_using(1000)


def test_a_compile_that_fails_stops_an_explicit_compile() -> None:
    compiled = CompiledForward(_DataDependentBranch(), batch_size=2, device=CPU, required=True)
    with pytest.raises(ModelConfigError, match=r"torch\.compile of the model failed"):
        compiled(torch.ones(2, 3))
