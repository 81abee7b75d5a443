"""Decoding stored 224x224 JPEG thumbnails into (N, 3, 224, 224) uint8 batches: one interface, three backends.

- `pillow`: libjpeg-turbo through Pillow on the host, a thumbnail at a time
  (`images.decode_thumbnail`). The CPU path, unchanged; on CUDA the last resort
  (a host decode, copied up from pinned memory).
- `nvjpeg`: torchvision's batched nvJPEG decode into GPU memory. torchvision
  serialises its decoder behind a process-wide mutex and entropy-decodes on
  the host (91% of a decode's wall time for these small images on an H100),
  which capped the embed stage at 16-18k img/s (issue 24).
- `nvimgcodec`: NVIDIA's nvImageCodec (optional package
  `nvidia-nvimgcodec-cu13[nvjpeg]`, a 25 MB wheel plus the nvJPEG one, under 4 MB):
  batched decode with its own host thread pool and the hardware JPEG engines
  of A100/H100/H200 class GPUs.

`choose_decoder` turns the `decoder` setting into a working decoder for a device.
Each candidate is built and then decodes one probe thumbnail, so a library that
imports but cannot decode here (no CUDA, nvImageCodec without its nvJPEG
library) counts as missing; `auto` then takes the next one and records why,
and a decoder named explicitly that cannot work is a `ModelConfigError`.

On CUDA every decoder enqueues its GPU work on the caller's current stream
(the embedding pipeline decodes on a side stream), so the caller orders the
model after it with an event, as it does for any other producer.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol

import numpy as np
import torch
from PIL import Image

from imgemb_assets.core.embedding.model_settings import GPU_DECODERS, ModelConfigError
from imgemb_assets.core.imaging.images import IMAGE_SIZE, decode_thumbnail, encode_jpeg

_log = logging.getLogger(__name__)

# Best first: the order `auto` tries on CUDA. Provisional until bench/gpu_check.py's
# decode figures on a lent GPU confirm nvImageCodec ahead of torchvision's nvJPEG.
CUDA_PREFERENCE: Final = ("nvimgcodec", "nvjpeg", "pillow")
CPU_PREFERENCE: Final = ("pillow",)
# nvImageCodec's backends on CUDA: the hardware JPEG engine where the GPU has one,
# then CUDA decoding, then nvJPEG's hybrid. Its CPU-only backend is left out so that
# a missing nvJPEG library shows as "cannot decode" instead of a silent host decode.
NVIMGCODEC_CUDA_BACKENDS: Final = ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU")
NVIMGCODEC_INSTALL_HINT: Final = "pip install 'nvidia-nvimgcodec-cu13[nvjpeg]' (CUDA 13 torch) or '-cu12[nvjpeg]'"
# The probe thumbnail's colour, distinct per channel so a swapped channel order fails the probe.
_PROBE_RGB: Final = (200, 30, 90)
# A flat colour survives the JPEG round trip to within IDCT rounding (Pillow: exactly);
# two levels leave room for a GPU decoder's IDCT.
_PROBE_TOLERANCE: Final = 2
_CPU: Final = torch.device("cpu")


class DecoderUnavailable(RuntimeError):
    """This backend cannot decode on this machine (not installed, no CUDA, its probe failed)."""


@dataclass(frozen=True)
class DecodedBatch:
    """Decoded thumbnails, and the library-owned images they were copied from.

    `owners` keeps those buffers alive until the caller drops the batch: on CUDA
    the copy out of them is only queued when `decode` returns, so the caller holds
    the batch until work ordered after that copy has finished.
    """

    pixels: torch.Tensor  # (N, 3, 224, 224) uint8 RGB, on the decoder's device
    owners: tuple[object, ...] = ()


class ThumbnailDecoder(Protocol):
    """Decodes a batch of stored thumbnails, on CUDA on the caller's current stream."""

    name: ClassVar[str]

    def decode(self, jpegs: Sequence[bytes]) -> DecodedBatch: ...


def decode_batch(jpegs: Sequence[bytes]) -> torch.Tensor:
    """Thumbnails decoded with Pillow into one (N, 3, 224, 224) uint8 tensor (an NHWC array seen as NCHW)."""
    batch = np.empty((len(jpegs), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for index, jpeg in enumerate(jpegs):
        batch[index] = decode_thumbnail(jpeg)
    return torch.from_numpy(batch).permute(0, 3, 1, 2)


class PillowDecoder:
    """Pillow on the host; on CUDA the batch is then copied up asynchronously from pinned memory."""

    name: ClassVar[str] = "pillow"

    def __init__(self, device: torch.device = _CPU) -> None:
        self.device = device

    def decode(self, jpegs: Sequence[bytes]) -> DecodedBatch:
        pixels = decode_batch(jpegs)
        if self.device.type == "cuda":
            # Pinned so the copy is asynchronous; torch's pinned allocator keeps the
            # buffer until the copy queued on the current stream has run.
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        return DecodedBatch(pixels)


class NvjpegDecoder:
    """torchvision's batched nvJPEG decode straight into GPU memory."""

    name: ClassVar[str] = "nvjpeg"

    def __init__(self, device: torch.device) -> None:
        _require_cuda(device)
        self.device = device

    def decode(self, jpegs: Sequence[bytes]) -> DecodedBatch:
        from torchvision.io import ImageReadMode, decode_jpeg

        # bytearray: torch.frombuffer wants a writable buffer, and bytes are not.
        data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
        return DecodedBatch(torch.stack(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)))


class NvimgcodecDecoder:
    """nvImageCodec's batched decode into planar RGB, on the GPU (or, for tests and checks, its CPU backend).

    `backend_kinds` names `nvimgcodec.BackendKind` members; the default is
    `NVIMGCODEC_CUDA_BACKENDS` on CUDA and `CPU_ONLY` on a CPU device, where the
    decode runs on libjpeg-turbo like Pillow's (used to compare pixels, never
    chosen for the CPU path).
    """

    name: ClassVar[str] = "nvimgcodec"

    def __init__(self, device: torch.device, backend_kinds: Sequence[str] | None = None) -> None:
        nvimgcodec = _import_nvimgcodec()
        if device.type == "cuda":
            _require_cuda(device)
            device_id = device.index if device.index is not None else torch.cuda.current_device()
            kinds = NVIMGCODEC_CUDA_BACKENDS if backend_kinds is None else backend_kinds
        else:
            device_id = nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY
            kinds = ("CPU_ONLY",) if backend_kinds is None else backend_kinds
        self.device = device
        self.backend_kinds = tuple(kinds)
        self._nvimgcodec = nvimgcodec
        self._decoder = nvimgcodec.Decoder(
            device_id=device_id, backends=[nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, k)) for k in kinds]
        )
        # Stored thumbnails are already upright (downscale applied EXIF orientation), and
        # Pillow's decode ignores EXIF too: applying it here would make the backends differ.
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=False,
            color_spec=nvimgcodec.ColorSpec.SRGB,
            sample_format=nvimgcodec.SampleFormat.P_RGB,  # planar: (3, H, W), the model's layout
        )
        # One decode at a time: two threads decoding through one nvImageCodec Decoder at
        # once broke its result bookkeeping ("Broken promise") and then hung (0.9.0, CPU
        # backend, the CPU pipeline's two decode threads). It parallelises inside a call.
        self._one_at_a_time = threading.Lock()

    def decode(self, jpegs: Sequence[bytes]) -> DecodedBatch:
        streams = [self._nvimgcodec.CodeStream(jpeg) for jpeg in jpegs]
        cuda_stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        with self._one_at_a_time:
            images = self._decoder.decode(streams, params=self._params, cuda_stream=cuda_stream)
        undecoded = [index for index, image in enumerate(images) if image is None]
        if undecoded:
            raise ValueError(
                f"nvImageCodec could not decode the thumbnails at {undecoded[:5]} of a batch of {len(jpegs)}"
            )
        planes = [self._as_tensor(image) for image in images]
        for plane in planes:
            if tuple(plane.shape) != (3, IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(
                    f"thumbnail decoded to shape {tuple(plane.shape)}, expected (3, {IMAGE_SIZE}, {IMAGE_SIZE})"
                )
        # The stack is the one copy, into a batch that torch's allocator owns.
        return DecodedBatch(torch.stack(planes), owners=tuple(images))

    def _as_tensor(self, image: Any) -> torch.Tensor:
        """A decoded image seen as a tensor, without a copy."""
        if self.device.type == "cuda":
            # DLPack hands the image over on torch's current stream (the decode's).
            return torch.from_dlpack(image)
        # A host image through the array interface: its DLPack export calls the CUDA
        # runtime even for host memory, which fails where no driver is installed.
        return torch.from_numpy(np.asarray(image))


DecoderBuilder = Callable[[torch.device], ThumbnailDecoder]
BUILDERS: Final[Mapping[str, DecoderBuilder]] = {
    "pillow": PillowDecoder,
    "nvjpeg": NvjpegDecoder,
    "nvimgcodec": NvimgcodecDecoder,
}


@dataclass(frozen=True)
class DecoderChoice:
    decoder: ThumbnailDecoder
    skipped: tuple[str, ...] = ()  # "<name>: <why>" for each better backend `auto` could not use

    @property
    def note(self) -> str:
        """For the step's metadata: empty when the best backend for the device was used."""
        return "; ".join(self.skipped)


def choose_decoder(
    setting: str, device: torch.device, builders: Mapping[str, DecoderBuilder] = BUILDERS
) -> DecoderChoice:
    """A decoder that has decoded a probe thumbnail on `device`, as the `decoder` setting asks.

    `builders` is replaceable only so that the order of the fallbacks can be
    checked where CUDA cannot exist; everything else uses the real ones.
    """
    if setting != "auto":
        if setting in GPU_DECODERS and device.type != "cuda":
            raise ModelConfigError(f"decoder {setting!r} decodes into GPU memory; use pillow or auto on {device}")
        try:
            return DecoderChoice(working_decoder(builders[setting], device))
        except DecoderUnavailable as exc:
            raise ModelConfigError(
                f"decoder {setting!r} cannot decode on {device}: {exc}. Install what it needs, or set decoder to "
                "auto to use the best one that works"
            ) from exc
    skipped: list[str] = []
    for name in CUDA_PREFERENCE if device.type == "cuda" else CPU_PREFERENCE:
        try:
            decoder = working_decoder(builders[name], device)
        except DecoderUnavailable as exc:
            skipped.append(f"{name}: {exc}")
            continue
        if skipped:
            _log.warning("thumbnails on %s decode with %s; skipped %s", device, name, "; ".join(skipped))
        return DecoderChoice(decoder, tuple(skipped))
    raise ModelConfigError(f"no thumbnail decoder works on {device}: {'; '.join(skipped)}")


def working_decoder(build: DecoderBuilder, device: torch.device) -> ThumbnailDecoder:
    """`build(device)`, once it has decoded the probe thumbnail to the right colour; DecoderUnavailable if not."""
    try:
        decoder = build(device)
        pixels = decoder.decode([probe_thumbnail()]).pixels.cpu()
    except DecoderUnavailable:
        raise
    except Exception as exc:  # torchvision, CUDA and nvImageCodec fail with many types
        raise DecoderUnavailable(f"{type(exc).__name__}: {exc}") from exc
    expected = torch.tensor(_PROBE_RGB, dtype=torch.int16).view(1, 3, 1, 1)
    if tuple(pixels.shape) != (1, 3, IMAGE_SIZE, IMAGE_SIZE):
        raise DecoderUnavailable(f"the probe thumbnail decoded to shape {tuple(pixels.shape)}")
    worst = int((pixels.to(torch.int16) - expected).abs().max())
    if worst > _PROBE_TOLERANCE:
        raise DecoderUnavailable(f"the probe thumbnail decoded {worst} levels off its colour {_PROBE_RGB}")
    return decoder


@functools.cache
def probe_thumbnail() -> bytes:
    """A flat-coloured thumbnail in the stored format (the project's own encoder)."""
    return encode_jpeg(Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), _PROBE_RGB))


def nvimgcodec_available() -> str | None:
    """None when nvImageCodec imports, else why not."""
    try:
        _import_nvimgcodec()
    except DecoderUnavailable as exc:
        return str(exc)
    return None


def _import_nvimgcodec() -> Any:
    try:
        return importlib.import_module("nvidia.nvimgcodec")
    except ImportError as exc:
        raise DecoderUnavailable(f"nvImageCodec is not installed ({exc}); {NVIMGCODEC_INSTALL_HINT}") from exc


def _require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise DecoderUnavailable(f"it decodes into GPU memory and the device is {device}")
    if not torch.cuda.is_available():
        raise DecoderUnavailable("CUDA is not available on this machine")
