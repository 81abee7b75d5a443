"""Progress lines of a long step: at most one per interval, with done/total, rate and ETA; a final line;
the totals as metadata. Driven by a fake clock: no sleeps."""

from __future__ import annotations

import threading

from imgemb_assets.core.embedding.progress import PROGRESS_INTERVAL_S, Progress, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_line_once_the_interval_has_passed_and_never_more_often() -> None:
    clock, lines = FakeClock(), []
    progress = Progress("p1: embedding", total=2000, log=lines.append, interval_s=30.0, clock=clock)
    progress.advance(100)
    clock.now += 29.9
    progress.advance(100)
    assert lines == []
    clock.now += 0.1  # 30 s since the start: 200 done, 10 more at 30 s
    progress.advance(10)
    assert lines == ["p1: embedding: 210/2000 (10.5%), 7.0 images/s, ETA 0:04:16"]
    for _ in range(50):  # many advances within the next interval: no line
        clock.now += 0.5
        progress.advance(1)
    assert len(lines) == 1
    clock.now += 5.0  # 30 s after the last line
    progress.advance(1)
    assert len(lines) == 2 and lines[1].startswith("p1: embedding: 261/2000 (13.1%), ")


def test_finish_logs_the_totals_once_and_metadata_keeps_them() -> None:
    clock, lines = FakeClock(), []
    progress = Progress("p1: embedding", total=300, log=lines.append, clock=clock, metadata_prefix="progress")
    progress.advance(120)
    progress.advance(180)
    clock.now += 60.0
    progress.finish()
    progress.finish()
    assert lines == ["p1: embedding: done, 300/300 in 60.0 s (5.0 images/s)"]
    clock.now += 100.0  # time after finish does not count
    assert progress.metadata() == {
        "progress_done": 300,
        "progress_total": 300,
        "progress_seconds": 60.0,
        "progress_images_per_second": 5.0,
    }


def test_metadata_without_a_prefix_and_nothing_to_do() -> None:
    clock, lines = FakeClock(), []
    progress = Progress("empty", total=0, log=lines.append, clock=clock)
    assert progress.metadata() == {"done": 0, "total": 0, "seconds": 0.0, "images_per_second": 0.0}
    progress.advance(0)
    progress.finish()
    assert lines == ["empty: done, 0/0 in 0.0 s (0.0 images/s)"]


def test_an_unknown_rate_shows_no_eta() -> None:
    clock, lines = FakeClock(), []
    progress = Progress("p", total=10, log=lines.append, interval_s=0.0, clock=clock)
    progress.advance(1)  # no time has passed: no rate yet
    assert lines == ["p: 1/10 (10.0%), 0.0 images/s, ETA ?"]


def test_advances_from_many_threads_are_all_counted() -> None:
    clock, lines = FakeClock(), []
    lock = threading.Lock()

    def log(line: str) -> None:
        with lock:
            lines.append(line)

    progress = Progress("p", total=8000, log=log, interval_s=1.0, clock=clock)

    def work() -> None:
        for _ in range(1000):
            clock.now += 0.01  # racy on purpose: the clock only moves forward
            progress.advance()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert progress.done == 8000
    # 80 s of fake time with a 1 s interval: at most one line a second
    assert 1 <= len(lines) <= 81


def test_durations_read_as_hours_minutes_seconds() -> None:
    assert format_duration(0) == "0:00:00"
    assert format_duration(59.6) == "0:01:00"
    assert format_duration(3 * 3600 + 7 * 60 + 5) == "3:07:05"
    assert format_duration(100_000) == "27:46:40"
    assert PROGRESS_INTERVAL_S == 30.0
