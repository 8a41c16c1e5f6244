"""Per-step training figures kept on the training device until the host reads them, so that a
training step never waits for the device: on a GPU, Python then runs ahead of the kernels."""

from typing import Any

import torch
from torch import Tensor


class DeviceRows:
    """Rows of one width, each appended on the device with a tag that stays on the host (the
    step it belongs to, say). ``take`` brings the oldest rows to the host in one copy; the
    buffer doubles when it is full, without a copy to the host."""

    def __init__(self, width: int) -> None:
        self.width = width
        self._buffer: Tensor | None = None
        self._tags: list[Any] = []

    def __len__(self) -> int:
        return len(self._tags)

    def append(self, row: Tensor, tag: Any = None) -> None:
        count = len(self._tags)
        buffer = self._buffer
        if buffer is None or count == len(buffer) or buffer.device != row.device:
            grown = torch.empty(max(64, 2 * count), self.width, dtype=row.dtype, device=row.device)
            if count:
                grown[:count].copy_(buffer[:count])
            self._buffer = buffer = grown
        buffer[count].copy_(row)
        self._tags.append(tag)

    def take(self, count: int | None = None) -> list[tuple[Any, list[float]]]:
        """The oldest ``count`` rows (all by default) with their tags, on the host, removed."""
        count = len(self._tags) if count is None else count
        if count == 0 or self._buffer is None:
            return []
        values = self._buffer[:count].tolist()
        rest = len(self._tags) - count
        if rest:
            self._buffer[:rest].copy_(self._buffer[count : count + rest].clone())
        taken = list(zip(self._tags[:count], values, strict=True))
        self._tags = self._tags[count:]
        return taken


def is_reading_step(trainer: Any, batch_idx: int) -> tuple[bool, bool]:
    """Whether the step just finished is one where the step records are read: a logging step
    (every ``trainer.log_every_n_steps``, a stopping run's last, every step of a fast dev run),
    and whether it is an epoch's or the run's last step (read, but starting no new window)."""
    every = trainer.log_every_n_steps
    logging_step = bool(every and trainer.global_step % every == 0) or trainer.should_stop
    logging_step = logging_step or bool(trainer.fast_dev_run)
    last = batch_idx + 1 == trainer.num_training_batches or trainer.global_step == trainer.max_steps
    return logging_step, last
