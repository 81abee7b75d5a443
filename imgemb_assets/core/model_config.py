"""The embedding model's settings, validated without importing torch.

Dagster resources build these when a code location loads, so this module stays
free of torch: only the step that embeds pays for importing it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

DEFAULT_BATCH_SIZE: Final = 64  # the article's batch size
RANDOM_WEIGHTS: Final = "random"
_DEVICE_PATTERN: Final = re.compile(r"auto|cpu|cuda(:\d+)?")


class ModelConfigError(ValueError):
    """The model settings are invalid or the weights cannot be loaded."""


@dataclass(frozen=True)
class EmbeddingSettings:
    """How to build and run the model.

    weights: a torchvision weights name such as `DEFAULT` or `IMAGENET1K_V2`
    (downloaded through torchvision's own cache), the path of a state-dict file,
    or `random` / `random:<seed>` for explicitly random-initialised weights.
    device: `auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`.
    """

    weights: str
    device: str = "auto"
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        if not self.weights.strip():
            raise ModelConfigError("model weights setting is empty; use DEFAULT, a state-dict path or 'random'")
        if self.batch_size < 1:
            raise ModelConfigError(f"batch size must be at least 1, got {self.batch_size}")
        if not _DEVICE_PATTERN.fullmatch(self.device):
            raise ModelConfigError(f"unsupported device {self.device!r}; use auto, cpu, cuda or cuda:N")


def parse_random_seed(weights: str) -> int | None:
    """The seed of a `random` / `random:<seed>` weights setting, or None for any other setting."""
    head, _, seed = weights.partition(":")
    if head.lower() != RANDOM_WEIGHTS:
        return None
    if not seed:
        return 0
    if not seed.isdigit():
        raise ModelConfigError(f"random weights seed must be a non-negative integer, got {seed!r}")
    return int(seed)
