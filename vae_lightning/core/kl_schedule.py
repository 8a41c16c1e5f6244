"""The KL weight beta of the training loss as a function of the training step.

- ``constant``: beta at every step.
- ``linear`` (warm-up): from ``start`` at step 0 to beta at ``warmup_steps``, then beta.
- ``cyclical`` (Fu et al. 2019, "Cyclical Annealing Schedule"): the run's steps are cut into
  ``cycles`` equal cycles; in each, beta rises linearly from ``start`` to beta over the first
  ``ratio`` of the cycle and stays there for the rest.

Reported ELBOs never use it: they always weigh the KL with 1.
"""

from dataclasses import dataclass

KINDS = ("constant", "linear", "cyclical")


@dataclass(frozen=True)
class KLSchedule:
    kind: str = "constant"
    start: float = 0.0
    warmup_steps: int = 10_000
    cycles: int = 4
    ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r}: it must be one of {', '.join(KINDS)}")
        if not self.start >= 0.0:
            raise ValueError(f"start={self.start!r}: it must be a number >= 0")
        if type(self.warmup_steps) is not int or self.warmup_steps < 1:
            raise ValueError(f"warmup_steps={self.warmup_steps!r}: it must be an integer >= 1")
        if type(self.cycles) is not int or self.cycles < 1:
            raise ValueError(f"cycles={self.cycles!r}: it must be an integer >= 1")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio={self.ratio!r}: it must be in (0, 1]")

    def __call__(self, step: int, beta: float, total_steps: float) -> float:
        """beta at ``step`` of a run of ``total_steps`` steps (used by ``cyclical`` only)."""
        if self.kind == "constant":
            return beta
        if self.kind == "linear":
            progress = min(step / self.warmup_steps, 1.0)
        else:
            cycle_length = total_steps / self.cycles
            position = (step % cycle_length) / cycle_length
            progress = min(position / self.ratio, 1.0)
        return self.start + (beta - self.start) * progress
