"""Decoding memory is bounded: the decode gate admits images by their estimated cost, never past its budget."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from imgemb_assets.core.imaging.images import DecodeGate, ImageLimits, decode_cost_bytes, downscale
from imgemb_assets.dagster_wiring.ingest.resources import ImageLimitsResource

_SETTLE_S = 0.3  # long enough for a wrongly admitted thread to get in


def _rgba_png(seed: int, size: int = 600) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size, size, 4), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _cost(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        return decode_cost_bytes(image)


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    return [_rgba_png(seed) for seed in range(12)]


def test_concurrent_decodes_never_exceed_the_budget(pngs: list[bytes]) -> None:
    budget = int(2.5 * _cost(pngs[0]))  # room for two of these images at once, not three
    gate = DecodeGate(budget)
    with ThreadPoolExecutor(max_workers=8) as pool:
        gated = list(pool.map(lambda data: downscale(data, gate=gate), pngs))
    assert gate.peak_bytes <= budget
    assert 1 <= gate.peak_decodes <= 2
    # the gate changes when an image decodes, never what it decodes to
    assert [t.jpeg for t in gated] == [downscale(data).jpeg for data in pngs]


def test_an_image_estimated_above_the_budget_still_decodes_alone(pngs: list[bytes]) -> None:
    gate = DecodeGate(1)  # every image costs more than this
    with ThreadPoolExecutor(max_workers=6) as pool:
        thumbnails = list(pool.map(lambda data: downscale(data, gate=gate), pngs[:6]))
    assert all(t.width == 600 for t in thumbnails)
    assert gate.peak_decodes == 1
    assert gate.peak_bytes <= 1


def test_a_decode_that_does_not_fit_waits_for_the_running_ones_to_finish() -> None:
    gate = DecodeGate(100)
    holding, release, admitted = threading.Event(), threading.Event(), threading.Event()

    def hold(cost: int) -> None:
        with gate.admit(cost):
            holding.set()
            release.wait()

    def second(cost: int) -> None:
        with gate.admit(cost):
            admitted.set()

    first = threading.Thread(target=hold, args=(60,))
    first.start()
    holding.wait()
    waiter = threading.Thread(target=second, args=(50,))
    waiter.start()
    assert not admitted.wait(_SETTLE_S), "60 + 50 bytes were admitted under a 100-byte budget"
    release.set()
    assert admitted.wait(10)
    first.join()
    waiter.join()
    assert gate.peak_bytes == 60


def _until(gate: DecodeGate, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll the gate's state, under its lock, until `condition` holds: waits for a state, never for a guessed time.

    A thread in the gate's waiting queue has already been refused admission once: it appends
    itself and tests its turn while holding the lock, and lets go of it only to wait.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        with gate._changed:
            if condition():
                return
        assert time.monotonic() < deadline, "the gate never reached the state awaited"
        time.sleep(0.001)


def test_waiters_are_admitted_in_arrival_order_so_a_large_image_is_not_starved() -> None:
    gate = DecodeGate(100)
    order: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with gate.admit(60):
            holding.set()
            release.wait()

    def decode(name: str, cost: int) -> None:
        with gate.admit(cost):
            order.append(name)

    threads = [threading.Thread(target=hold)]
    threads[0].start()
    try:
        holding.wait()
        threads.append(threading.Thread(target=decode, args=("large", 100)))
        threads[-1].start()
        _until(gate, lambda: len(gate._waiting) == 1)  # the large image queues first
        threads.append(threading.Thread(target=decode, args=("small", 10)))  # fits now, but arrived later
        threads[-1].start()
        # the small image has arrived: queued behind the large one, or (wrongly) admitted past it
        _until(gate, lambda: len(gate._waiting) == 2 or "small" in order)
        assert order == []
    finally:  # a failed assertion must not leave the threads waiting forever
        release.set()
        for thread in threads:
            thread.join(10)
    assert order == ["large", "small"]


def test_the_cost_is_read_from_the_header_and_a_jpeg_costs_its_reduced_decode_size() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2000, 3000, 3), dtype=np.uint8)
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG")
    Image.fromarray(pixels).convert("RGBA").save(png, format="PNG", compress_level=1)
    with Image.open(png) as image:
        assert decode_cost_bytes(image) >= 3000 * 2000 * 24  # measured: 24.2 bytes per RGBA pixel
    with Image.open(jpeg) as image:
        image.draft("RGB", (224, 224))  # as downscale does: decoded at 1/8 scale
        assert decode_cost_bytes(image) < 3000 * 2000


def test_the_budget_is_a_setting_of_the_image_limits() -> None:
    assert ImageLimitsResource(max_decode_bytes=123).limits().max_decode_bytes == 123
    assert ImageLimits().max_decode_bytes == 1 << 30
    with pytest.raises(ValueError, match="max_decode_bytes"):
        ImageLimits(max_decode_bytes=0)
