"""Thumbnail decode backends: which one a setting gets on a device, the fallbacks and refusals, equal pixels.

No CUDA exists here, so the GPU backends' own decoding is not exercised: the
tests check what the CPU can see. A missing nvImageCodec is made real by
hiding the module (`sys.modules[...] = None`); the refusals of nvJPEG and of
Pillow-on-CUDA where CUDA is missing are real. Only the test of the fallback
order needs a backend that works on CUDA, and there a host decoder stands in
for nvJPEG. Where nvImageCodec is installed (`nvidia-nvimgcodec-cu13`), its
CPU backend is checked to give Pillow's pixels for stored thumbnails; without it
that test is skipped.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from imgemb_assets.core.embedding.model_settings import EmbeddingSettings, ModelConfigError
from imgemb_assets.core.embedding.models import load_model
from imgemb_assets.core.embedding.thumbnail_decoders import (
    BUILDERS,
    DecodedBatch,
    DecoderUnavailable,
    NvimgcodecDecoder,
    PillowDecoder,
    choose_decoder,
    decode_batch,
    probe_thumbnail,
    working_decoder,
)
from imgemb_assets.core.imaging.images import downscale
from imgemb_assets.core.imaging.synthetic import synthetic_photo

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
no_cuda_here = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens where CUDA is missing")


@pytest.fixture(scope="module")
def stored_thumbnails() -> list[bytes]:
    """Thumbnails as the downscale step stores them: photos of varied shapes, a grey one, a palette one."""
    rng = np.random.default_rng(24)
    sources = [synthetic_photo(rng, w, h) for w, h in [(640, 480), (300, 900), (224, 224), (1000, 260), (90, 120)]]
    sources += [synthetic_photo(rng, 400, 300).convert("L"), synthetic_photo(rng, 256, 256).convert("P")]
    out = []
    for image in sources:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG" if image.mode == "P" else "JPEG", quality=90)
        out.append(downscale(buffer.getvalue()).jpeg)
    return out


@pytest.fixture
def nvimgcodec_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvImageCodec made uninstallable for this test, whether or not it is installed here."""
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)


class _NvjpegStandIn(PillowDecoder):
    """Stands in for nvJPEG, which needs CUDA: a host decoder under nvJPEG's name."""

    name = "nvjpeg"

    def __init__(self, device: torch.device) -> None:
        super().__init__(CPU)


class _ChannelsSwapped(PillowDecoder):
    """A decoder that gives BGR instead of RGB: a real decode, wrongly laid out."""

    name = "nvimgcodec"

    def __init__(self, device: torch.device) -> None:
        super().__init__(CPU)

    def decode(self, jpegs: Sequence[bytes]) -> DecodedBatch:
        return DecodedBatch(super().decode(jpegs).pixels.flip(1))


def test_auto_on_cpu_is_pillow_giving_the_cpu_paths_pixels(stored_thumbnails: list[bytes]) -> None:
    choice = choose_decoder("auto", CPU)
    assert choice.decoder.name == "pillow"
    assert choice.note == ""
    assert torch.equal(choice.decoder.decode(stored_thumbnails).pixels, decode_batch(stored_thumbnails))


def test_a_cpu_model_decodes_with_pillow_and_is_not_compiled() -> None:
    model = load_model(EmbeddingSettings(weights="random", model="resnet18", device="cpu"))
    assert model.decoder.name == "pillow"
    assert model.decoder_note == ""
    assert model.compiled is None
    assert model.runtime_metadata() == {"decoder": "pillow", "decoder_note": "", "compiled": False}


@pytest.mark.parametrize("decoder", ["nvjpeg", "nvimgcodec"])
def test_gpu_decoders_are_refused_on_cpu(decoder: str) -> None:
    with pytest.raises(ModelConfigError, match=f"decoder '{decoder}' decodes into GPU memory"):
        EmbeddingSettings(weights="random", device="cpu", decoder=decoder)
    # device=auto resolves to CPU only when the model is built: refused there too.
    with pytest.raises(ModelConfigError, match=f"decoder '{decoder}' decodes into GPU memory"):
        choose_decoder(decoder, CPU)


def test_an_unknown_decoder_is_refused() -> None:
    with pytest.raises(ModelConfigError, match="unknown decoder 'dali'"):
        EmbeddingSettings(weights="random", decoder="dali")


@pytest.mark.usefixtures("nvimgcodec_missing")
def test_nvimgcodec_named_but_not_installed_is_refused_with_how_to_install_it() -> None:
    with pytest.raises(ModelConfigError, match="decoder 'nvimgcodec' cannot decode on cuda") as refused:
        choose_decoder("nvimgcodec", CUDA)
    assert "nvImageCodec is not installed" in str(refused.value)
    assert "nvidia-nvimgcodec-cu13[nvjpeg]" in str(refused.value)


@no_cuda_here
def test_nvjpeg_named_without_cuda_is_refused() -> None:
    with pytest.raises(ModelConfigError, match="decoder 'nvjpeg' cannot decode on cuda: CUDA is not available"):
        choose_decoder("nvjpeg", CUDA)


@pytest.mark.usefixtures("nvimgcodec_missing")
def test_auto_on_cuda_falls_back_to_nvjpeg_when_nvimgcodec_is_missing_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    builders = {**BUILDERS, "nvjpeg": _NvjpegStandIn}
    with caplog.at_level(logging.WARNING, logger="imgemb_assets.core.embedding.thumbnail_decoders"):
        choice = choose_decoder("auto", CUDA, builders)
    assert isinstance(choice.decoder, _NvjpegStandIn)
    assert len(choice.skipped) == 1
    assert choice.note.startswith("nvimgcodec: nvImageCodec is not installed")
    assert "decode with nvjpeg" in caplog.text and "nvimgcodec: nvImageCodec is not installed" in caplog.text


@pytest.mark.usefixtures("nvimgcodec_missing")
@no_cuda_here
def test_auto_on_cuda_with_no_working_decoder_is_refused_listing_each_reason() -> None:
    # Here every real backend fails for CUDA: nvImageCodec is missing, nvJPEG has no
    # CUDA, and Pillow's pinned copy up has no CUDA either.
    with pytest.raises(ModelConfigError, match="no thumbnail decoder works on cuda") as refused:
        choose_decoder("auto", CUDA)
    message = str(refused.value)
    assert "nvimgcodec: nvImageCodec is not installed" in message
    assert "nvjpeg: CUDA is not available" in message
    assert "pillow: " in message


def test_a_decoder_that_gets_the_channels_wrong_fails_its_probe_and_auto_moves_on() -> None:
    with pytest.raises(DecoderUnavailable, match="levels off its colour"):
        working_decoder(_ChannelsSwapped, CPU)
    # Offered as the best CUDA backend, it is skipped for the next working one.
    builders = {**BUILDERS, "nvimgcodec": _ChannelsSwapped, "nvjpeg": _NvjpegStandIn}
    choice = choose_decoder("auto", CUDA, builders)
    assert isinstance(choice.decoder, _NvjpegStandIn)
    assert choice.note.startswith("nvimgcodec: the probe thumbnail decoded")


def test_the_probe_is_a_stored_format_thumbnail() -> None:
    with Image.open(io.BytesIO(probe_thumbnail())) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (224, 224))


def test_nvimgcodec_cpu_backend_gives_pillows_pixels_for_stored_thumbnails(stored_thumbnails: list[bytes]) -> None:
    """Tolerance 0: both run libjpeg-turbo's decode on 4:4:4 thumbnails, so every pixel is equal."""
    pytest.importorskip("nvidia.nvimgcodec", reason="nvidia-nvimgcodec-cu13 is an optional package")
    decoder = NvimgcodecDecoder(CPU)
    decoded = decoder.decode(stored_thumbnails)
    assert decoded.pixels.dtype == torch.uint8
    assert tuple(decoded.pixels.shape) == (len(stored_thumbnails), 3, 224, 224)
    assert len(decoded.owners) == len(stored_thumbnails)
    assert torch.equal(decoded.pixels, decode_batch(stored_thumbnails))


def test_nvimgcodec_refuses_a_batch_with_an_undecodable_thumbnail(stored_thumbnails: list[bytes]) -> None:
    pytest.importorskip("nvidia.nvimgcodec", reason="nvidia-nvimgcodec-cu13 is an optional package")
    damaged = stored_thumbnails[0][: len(stored_thumbnails[0]) // 3]
    with pytest.raises(ValueError, match=r"could not decode the thumbnails at \[1\] of a batch of 2"):
        NvimgcodecDecoder(CPU).decode([stored_thumbnails[1], damaged])


def test_nvimgcodec_decodes_correctly_from_two_threads_at_once(stored_thumbnails: list[bytes]) -> None:
    """Unserialised, nvImageCodec 0.9 returned no images to one thread and hung the other."""
    pytest.importorskip("nvidia.nvimgcodec", reason="nvidia-nvimgcodec-cu13 is an optional package")
    decoder = NvimgcodecDecoder(CPU)
    expected = decode_batch(stored_thumbnails)
    outcomes: dict[int, list[bool | str]] = {0: [], 1: []}

    def decode_repeatedly(thread: int) -> None:
        try:
            for _ in range(10):
                outcomes[thread].append(torch.equal(decoder.decode(stored_thumbnails).pixels, expected))
        except ValueError as exc:
            outcomes[thread].append(str(exc))

    # Daemon threads joined with a timeout: a hung decode fails the test instead of hanging the run.
    threads = [threading.Thread(target=decode_repeatedly, args=(i,), daemon=True) for i in outcomes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a decode hung"
    assert outcomes == {0: [True] * 10, 1: [True] * 10}
