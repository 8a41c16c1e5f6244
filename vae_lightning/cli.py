"""What every command shares: the config folder, the config resolvers, and one way to report
the errors a user can make (one line, no traceback, in a single run and in a sweep job)."""

import errno
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import OmegaConf

from vae_lightning.config import ConfigError
from vae_lightning.data.cifar10 import DatasetCorruptError, DatasetNotFoundError
from vae_lightning.evaluation.fid import FIDNetworkError, FIDUnavailableError
from vae_lightning.launch.hydra_callbacks import JobFailed
from vae_lightning.launch.multirun import is_multirun, sweep_group
from vae_lightning.launch.run_files import (
    DiskFullError,
    RunFileDamagedError,
    RunFilesNotFoundError,
    disk_full_message,
)
from vae_lightning.training.checkpoints import CheckpointError
from vae_lightning.training.lit_module import NonFiniteLossError

_PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = str(
    next(p for p in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf") if p.is_dir())
)
"""Inside the package when installed from a wheel, beside it in a checkout."""

KNOWN_ERRORS = (
    ConfigError,
    MisconfigurationException,
    DatasetNotFoundError,
    DatasetCorruptError,
    PermissionError,
    NonFiniteLossError,
    RunFilesNotFoundError,
    RunFileDamagedError,
    DiskFullError,
    FIDUnavailableError,
    FIDNetworkError,
    CheckpointError,
)
"""Errors whose message says what went wrong and what to do: shown without a traceback."""


def register_resolvers() -> None:
    """``${sweep_group:}``: the W&B group shared by the jobs of one multirun."""
    OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)


def is_out_of_memory(err: BaseException) -> bool:
    """A failed allocation: CUDA's, or the CPU allocator's."""
    return isinstance(err, torch.cuda.OutOfMemoryError | MemoryError) or (
        "can't allocate memory" in str(err)
    )


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn a known error into one line: the process exits with it, or, in a sweep job, the
    job fails with it and the sweep goes on (see ``RecordFailedJobs``)."""
    try:
        yield
        return
    except KNOWN_ERRORS as err:
        invalid = isinstance(err, ConfigError | MisconfigurationException)
        message = f"{'Invalid configuration' if invalid else 'Error'}: {err}"
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        message = f"Error: {disk_full_message(Path(err.filename) if err.filename else None)}"
    except (torch.cuda.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not is_out_of_memory(err):
            raise
        wanted = re.search(r"(?i)tried to allocate ([\d.]+) ?(\w+)", str(err))
        amount = ""
        if wanted:
            size, unit = float(wanted.group(1)), wanted.group(2)
            amount = f"{size / 2**30:.2f} GiB" if unit == "bytes" else f"{size:g} {unit}"
            amount = f" ({amount} could not be allocated)"
        message = (
            f"Error: out of memory{amount}. Lower data.batch_size or "
            "the model's size (model.arch.*), or eval.max_batch in an evaluation."
        )
    if is_multirun():
        raise JobFailed(message) from None
    raise SystemExit(message) from None


_NOISE = (
    "💡 Tip: ",  # Lightning advertising a hosted logger
    "Trainer already configured with model summary callbacks",  # we configure it on purpose
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NOISE)


def quiet_third_party_warnings() -> None:
    """Hide messages of other libraries that tell a user of this project nothing: Lightning's
    tips and notes on its own internals, and a deprecation inside Lightning's use of torch's
    pytrees. Every other warning still shows."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
