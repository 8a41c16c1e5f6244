"""Progress of long evaluation passes on stderr: a line every so many images (rewritten in place
on a terminal, one line each in a log file) with the rate and the time left."""

import math
import sys
import time


class PassProgress:
    """``what``: ``done``/``total`` images, whenever ``done`` crosses a multiple of ``every`` and
    at the end, at the rate of the images this process computed (a resumed pass starts at
    ``done``, and those images do not count towards the rate)."""

    def __init__(self, what: str, total: int, done: int = 0, every: int = 1000) -> None:
        self.what, self.total, self.every = what, total, every
        self.done = self.done_at_start = done
        self.started = time.perf_counter()
        self.in_place = sys.stderr.isatty()

    def advance_to(self, done: int) -> bool:
        """Move to ``done`` images; True (after a line) when that crossed an ``every``."""
        crossed = done // self.every > self.done // self.every or done == self.total
        self.done = done
        if crossed:
            end = "\r" if self.in_place and done < self.total else "\n"
            print(self.line(), file=sys.stderr, end=end)
        return crossed

    def line(self) -> str:
        rate = (self.done - self.done_at_start) / max(time.perf_counter() - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else math.inf
        return (
            f"{self.what}: {self.done}/{self.total} images, {rate:.1f} images/s, "
            f"~{left / 60:.0f} min left"
        )
