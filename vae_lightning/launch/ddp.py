"""DDP inside a Hydra multirun: each sweep job starts its own ranks, for that job only."""

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write

FAILED_JOB_GRACE_S = 5.0
"""How long the other ranks of a job that failed on this rank get to end by themselves."""

_CONFIG_FLAGS = ("-cn", "-cp", "-cd", "--config-name", "--config-path", "--config-dir")


def _config_flags(args: list[str]) -> list[str]:
    """The ``--config-name``-style flags of a command line, with their values."""
    kept: list[str] = []
    for i, arg in enumerate(args):
        if arg in _CONFIG_FLAGS and i + 1 < len(args):
            kept += [arg, args[i + 1]]
        elif arg.startswith(tuple(f"{flag}=" for flag in _CONFIG_FLAGS)):
            kept.append(arg)
    return kept


@contextmanager
def isolated_ddp_job() -> Iterator[None]:
    """Run this Hydra job's DDP ranks for this job only, and leave nothing behind for the next.

    Lightning's launcher starts the other ranks by re-running ``sys.argv`` with ``hydra.run.dir``
    set to HydraConfig's ``run.dir``. In a multirun, that argv holds ``-m`` and the whole sweep,
    and ``run.dir`` is a fresh dated folder, so every rank would start its own sweep in new
    folders. Here argv becomes this job's overrides and ``run.dir`` this job's output folder.
    Afterwards the other ranks have ended, and the process group and the variables the
    launcher set (``MASTER_PORT``, ...) are removed, so that the next job starts its own.
    """
    hydra_cfg = HydraConfig.get()
    saved_argv, saved_dir, saved_env = sys.argv, hydra_cfg.run.dir, dict(os.environ)
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sys.argv = [saved_argv[0], *_config_flags(saved_argv[1:]), *hydra_cfg.overrides.task]
    try:
        yield
    except BaseException:
        # the other ranks may wait at a collective for this one (a checkpoint's barrier, when
        # rank 0 could not write it): there is nothing left for them to finish
        _end_other_ranks(timeout_s=FAILED_JOB_GRACE_S)
        raise
    else:
        _end_other_ranks()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = saved_dir


def _end_other_ranks(timeout_s: float = 60.0) -> None:
    """Wait for the ranks Lightning started for this job to end (killing any still running
    after ``timeout_s``), having first stopped the thread that watches them. That thread kills
    the whole process, and with it the rest of a sweep, once a rank exits with an error, which
    is how the other ranks of a failed job end."""
    for thread in threading.enumerate():
        if thread.name != "child-process-observer":
            continue
        ranks = getattr(thread, "_child_processes", [])
        watched, ranks[:] = list(ranks), []  # with none left to watch, its next poll ends it
        for proc in watched:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
