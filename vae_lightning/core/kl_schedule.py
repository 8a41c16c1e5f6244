"""The KL weight beta of the training loss as a function of the training step.

- ``constant``: beta at every step.
- ``linear`` (warm-up): from ``start`` at step 0 to beta at ``warmup_steps``, then beta.
- ``cyclical`` (Fu et al. 2019, "Cyclical Annealing Schedule"): the run's steps are cut into
  ``cycles`` equal cycles; in each, beta rises linearly from ``start`` to beta over the first
  ``ratio`` of the cycle and stays there for the rest.

Reported ELBOs never use it: they always weigh the KL with 1.
"""

from dataclasses import dataclass

from vae_lightning.errors import ConfigError

KINDS = ("constant", "linear", "cyclical")


@dataclass(frozen=True)
class KLSchedule:
    kind: str = "constant"
    start: float = 0.0
    warmup_steps: int = 10_000
    cycles: int = 4
    ratio: float = 0.5

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                value = getattr(self, name)
                raise ConfigError(f"{name}={value!r} is not allowed: {name} must be {allowed}.")

        check(self.kind in KINDS, "kind", f"one of {', '.join(KINDS)}")
        check(_is_number(self.start) and self.start >= 0.0, "start", "a number >= 0")
        check(_is_count(self.warmup_steps), "warmup_steps", "an integer >= 1")
        check(_is_count(self.cycles), "cycles", "an integer >= 1")
        check(_is_number(self.ratio) and 0.0 < self.ratio <= 1.0, "ratio", "in (0, 1]")

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


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 1
