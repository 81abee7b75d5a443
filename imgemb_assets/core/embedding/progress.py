"""Progress of a long step, logged as it goes: done/total, images/s and ETA, at most once per interval.

A big partition (tens of thousands of photos) takes minutes to hours in one step;
these lines make it visible in the run's logs while it runs, and `metadata()`
keeps the totals for the step's materialization.

    progress = Progress("2026-11-01: embedding", total=rows, log=context.log.info)
    for batch in batches:
        ...
        progress.advance(len(batch))
    progress.finish()
    metadata |= progress.metadata()

`advance` may be called from several threads at once (a decode pool); `log` is
called outside the lock, so a slow logger (Dagster writes each line to the event
log) never holds the workers back. No Dagster import: `log` is any callable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final

# How often a long step says where it is, unless told otherwise.
PROGRESS_INTERVAL_S: Final = 30.0


class Progress:
    """Counts work done against a known total and logs a line at most every `interval_s` seconds.

    Lines look like `2026-11-01: embedding: 1200/2000 (60.0%), 41.3 images/s, ETA 0:00:19`.
    `total` may be 0 when there is nothing to do (the percentage then reads 100%).
    `metadata_prefix`, when given, is put before each metadata key with an underscore
    (`"progress"` gives `progress_done`, `progress_total`, ...), so that two counters
    can report into the same materialization.
    """

    def __init__(
        self,
        what: str,
        total: int,
        log: Callable[[str], None],
        interval_s: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        *,
        metadata_prefix: str = "",
    ) -> None:
        self.what = what
        self.total = max(0, int(total))
        self.interval_s = interval_s
        self._log = log
        self._clock = clock
        self._metadata_prefix = f"{metadata_prefix}_" if metadata_prefix else ""
        self._lock = threading.Lock()
        self._done = 0
        self._started = clock()
        self._last_line = self._started
        self._finished_at: float | None = None

    @property
    def done(self) -> int:
        return self._done

    def advance(self, done: int = 1) -> None:
        """Count `done` more items; log a line when `interval_s` has passed since the last one."""
        if done <= 0:
            return
        with self._lock:
            self._done += done
            now = self._clock()
            if now - self._last_line < self.interval_s:
                return
            self._last_line = now
            line = self._line(self._done, now - self._started)
        self._log(line)

    def finish(self) -> None:
        """Log the final line (once, however often it is called): the totals and the seconds taken."""
        with self._lock:
            if self._finished_at is not None:
                return
            self._finished_at = self._clock()
            done, seconds = self._done, self._finished_at - self._started
        rate = done / seconds if seconds > 0 else 0.0
        self._log(f"{self.what}: done, {done}/{self.total} in {seconds:.1f} s ({rate:.1f} images/s)")

    def metadata(self) -> dict[str, int | float]:
        """done, total, seconds (until `finish`, or until now) and images_per_second, each key after the prefix."""
        with self._lock:
            end = self._finished_at if self._finished_at is not None else self._clock()
            done, seconds = self._done, end - self._started
        values: dict[str, int | float] = {
            "done": done,
            "total": self.total,
            "seconds": round(seconds, 3),
            "images_per_second": round(done / seconds, 2) if seconds > 0 else 0.0,
        }
        return {f"{self._metadata_prefix}{key}": value for key, value in values.items()}

    def _line(self, done: int, seconds: float) -> str:
        rate = done / seconds if seconds > 0 else 0.0
        share = 100.0 * done / self.total if self.total else 100.0
        left = max(0, self.total - done)
        eta = format_duration(left / rate) if rate > 0 else "?"
        return f"{self.what}: {done}/{self.total} ({share:.1f}%), {rate:.1f} images/s, ETA {eta}"


def format_duration(seconds: float) -> str:
    """`h:mm:ss`, rounded to the second (hours unbounded: `27:46:40`)."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
