"""Progress of long evaluation passes on stderr: a line every so many images and at least every
few seconds (rewritten in place on a terminal, one line each in a log file) with the rate and
the time left."""

import math
import sys
import time


class PassProgress:
    """``what``: ``done``/``total`` images, whenever ``done`` crosses a multiple of ``every``,
    when ``interval_s`` seconds have passed since the last line, and at the end, at the rate of
    the images this process computed (a resumed pass starts at ``done``, and those images do
    not count towards the rate)."""

    def __init__(
        self, what: str, total: int, done: int = 0, every: int = 1000, interval_s: float = 10.0
    ) -> None:
        self.what, self.total, self.every, self.interval_s = what, total, every, interval_s
        self.done = self.done_at_start = done
        self.started = self.last_line = time.perf_counter()
        self.in_place = sys.stderr.isatty()

    def advance_to(self, done: int) -> bool:
        """Move to ``done`` images, with a line when due; True when that crossed an ``every``
        (a pass saves its state there)."""
        crossed = done // self.every > self.done // self.every or done == self.total
        self.done = done
        now = time.perf_counter()
        if crossed or now - self.last_line >= self.interval_s:
            self.last_line = now
            end = "\r" if self.in_place and done < self.total else "\n"
            print(self.line(now), file=sys.stderr, end=end)
        return crossed

    def line(self, now: float) -> str:
        rate = (self.done - self.done_at_start) / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else math.inf
        return (
            f"{self.what}: {self.done}/{self.total} images, {rate:.1f} images/s, "
            f"~{left / 60:.0f} min left"
        )
