"""The wall time of training, kept across the runs that resume one another."""

import time
from typing import Any

import lightning as L


class FitClock(L.Callback):
    """Times each fit; the time travels in the checkpoint (``fit_seconds``), so that a resumed
    run's time includes the runs it resumes, each up to its last checkpoint (work lost after
    it is done again, and counted then)."""

    def __init__(self) -> None:
        self._done = 0.0  # the runs this one resumes, and finished fits
        self._started: float | None = None

    @property
    def seconds(self) -> float:
        """Wall time of training so far."""
        running = 0.0 if self._started is None else time.perf_counter() - self._started
        return self._done + running

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._done = self.seconds
        self._started = None

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["fit_seconds"] = self.seconds

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._done = float(checkpoint.get("fit_seconds", 0.0))
