"""What every command shares: the config folder, the config resolvers, and one way to report
the errors a user can make (one line, no traceback, in a single run and in a sweep job)."""

import argparse
import errno
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from vae_lightning.errors import UserError
from vae_lightning.files import disk_full_message
from vae_lightning.launch.hydra_callbacks import JobFailed
from vae_lightning.launch.multirun import is_multirun, sweep_group

_PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = str(
    next(p for p in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf") if p.is_dir())
)
"""Inside the package when installed from a wheel, beside it in a checkout."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Paragraphs as written; each option's default after its help, unless it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        if shown and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def argument_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The parser of ``python -m <module>``: ``doc`` (the command's docstring) as plain text,
    without its ``literal`` marks, and every option's default in ``--help``."""
    return argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=doc.replace("``", ""),
        formatter_class=_HelpFormatter,
    )


def register_resolvers() -> None:
    """``${sweep_group:}``: the W&B group shared by the jobs of one multirun."""
    OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)


def is_out_of_memory(err: BaseException) -> bool:
    """A failed allocation: CUDA's (``torch.OutOfMemoryError``), or the CPU allocator's."""
    return (
        isinstance(err, MemoryError)
        or type(err).__name__ == "OutOfMemoryError"
        or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err))
    )


def _out_of_memory_line(err: BaseException) -> str:
    wanted = re.search(r"(?i)tried to allocate ([\d.]+) ?(\w+)", str(err))
    amount = ""
    if wanted:
        size, unit = float(wanted.group(1)), wanted.group(2)
        amount = f"{size / 2**30:.2f} GiB" if unit == "bytes" else f"{size:g} {unit}"
        amount = f" ({amount} could not be allocated)"
    return (
        f"Error: out of memory{amount}. Lower data.batch_size or the model's size "
        "(model.arch.*), or eval.max_batch in an evaluation."
    )


def one_line(err: BaseException) -> str | None:
    """The line a command shows for ``err``: a ``UserError``, Lightning's refusal of a setting,
    a folder that cannot be read or written, a full disk, a failed allocation; None for any
    other error, which is a bug and keeps its traceback."""
    if isinstance(err, UserError):
        return f"{err.label}: {err}"
    if type(err).__name__ == "MisconfigurationException":  # Lightning refused a setting
        return f"Invalid configuration: {err}"
    if isinstance(err, PermissionError):
        return f"Error: {err}"
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"Error: {disk_full_message(Path(err.filename) if err.filename else None)}"
    if is_out_of_memory(err):
        return _out_of_memory_line(err)
    return None


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn an error a user can fix into ``one_line``: the process exits with it, or, in a
    sweep job, the job fails with it and the sweep goes on (see ``RecordFailedJobs``)."""
    try:
        yield
        return
    except Exception as err:
        message = one_line(err)
        if message is None:
            raise
    if is_multirun():
        raise JobFailed(message)
    raise SystemExit(message)


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
