"""Hydra run bookkeeping: W&B groups per sweep, the resolved config, DDP inside a multirun."""

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

log = logging.getLogger(__name__)

_CONFIG_FLAGS = ("-cn", "-cp", "-cd", "--config-name", "--config-path", "--config-dir")


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_group() -> str | None:
    """A name shared by the jobs of one multirun (its folder's date and time), else None."""
    if not is_multirun():
        return None
    return "sweep_" + "_".join(Path(HydraConfig.get().sweep.dir).parts[-2:])


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"sigma": 0.1}}`` -> ``{"model.sigma": 0.1}``, for loggers' config tables."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def save_resolved_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    path = Path(output_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
    return path


def save_final_metrics(metrics: dict[str, float], output_dir: str | Path) -> Path:
    """``metrics.json``: the last train step's, last validation's and the test's metrics."""
    path = Path(output_dir) / "metrics.json"
    path.write_text(json.dumps(dict(sorted(metrics.items())), indent=2))
    return path


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
    Afterwards the process group and the variables the launcher set (``MASTER_PORT``, ...) are
    removed, so that the next job of the sweep starts its own.
    """
    hydra_cfg = HydraConfig.get()
    saved_argv, saved_dir, saved_env = sys.argv, hydra_cfg.run.dir, dict(os.environ)
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sys.argv = [saved_argv[0], *_config_flags(saved_argv[1:]), *hydra_cfg.overrides.task]
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = saved_dir


class JobFailed(RuntimeError):
    """A sweep job stopped for a reason already explained in its message (no traceback needed)."""


class RecordFailedJobs(Callback):
    """Hydra callback: after each failed job of a multirun, one log line and an entry in
    ``<sweep folder>/failed_jobs.yaml`` (job number, overrides, error); the sweep carries on."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED or not is_multirun():
            return
        hydra_cfg = HydraConfig.get()
        error = job_return._return_value
        entry = {
            "job": hydra_cfg.job.num,
            "overrides": list(job_return.overrides or []),
            "error": f"{type(error).__name__}: {error}",
        }
        log.error(f"Job {entry['job']} ({' '.join(entry['overrides'])}) failed: {entry['error']}")
        path = Path(hydra_cfg.sweep.dir) / "failed_jobs.yaml"
        failed = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
        OmegaConf.save(OmegaConf.create([*failed, entry]), path)


class CheckOutputFolder(Callback):
    """Hydra callback: before any job starts, exit with one message if its output folder cannot
    be created (a SystemExit: Hydra turns a callback's exceptions into warnings and goes on)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_creatable(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_creatable(config.hydra.sweep.dir)


def _check_creatable(folder: str) -> None:
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(
            f"Error: cannot create the output folder {path}: {existing} is not a writable "
            "folder. Set paths.output_root=<a writable folder>."
        )
