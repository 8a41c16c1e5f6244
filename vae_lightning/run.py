"""Hydra run bookkeeping: W&B groups per sweep, the resolved config, DDP inside a multirun,
resuming requeued jobs, plugins and GPUs of parallel sweeps."""

import fcntl
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, ValidationError, read_write

log = logging.getLogger(__name__)

PLUGINS = {
    "hydra/launcher=submitit_": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib"),
    "hparams_search=optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
}
"""Command-line overrides that need a Hydra plugin: its module and the extra that installs it."""

_CONFIG_FLAGS = ("-cn", "-cp", "-cd", "--config-name", "--config-path", "--config-dir")


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_group() -> str | None:
    """A name shared by the jobs of one multirun (its folder's date and time), else None."""
    if not is_multirun():
        return None
    return "sweep_" + "_".join(Path(HydraConfig.get().sweep.dir).parts[-2:])


def check_plugins(args: Sequence[str]) -> None:
    """Exit with the pip command to run if an override names a Hydra plugin that is missing
    (Hydra itself would only say that the config group has no such option)."""
    for arg in args:
        for prefix, (module, extra) in PLUGINS.items():
            if arg.startswith(prefix) and importlib.util.find_spec(module) is None:
                raise SystemExit(
                    f"Error: {arg} needs the {module.split('.')[-1]} plugin, which is not "
                    f'installed: pip install -e ".[{extra}]" (or "vae_lightning[{extra}]").'
                )


def last_checkpoint(output_dir: str | Path) -> str | None:
    """``<output_dir>/checkpoints/last.ckpt`` if it exists: a requeued or re-run job resumes
    from it."""
    path = Path(output_dir) / "checkpoints" / "last.ckpt"
    return str(path) if path.is_file() else None


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


class CheckBeforeLaunch(Callback):
    """Hydra callback: before any job starts, exit with one message if the output folder cannot
    be created or the SLURM launcher's task counts are not integers (a SystemExit: Hydra turns a
    callback's exceptions into warnings and goes on); create the folder of an SQLite study."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_output_root(config)
        _check_creatable(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_output_root(config)
        _check_creatable(config.hydra.sweep.dir)
        launcher = config.hydra.launcher
        if str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
            for key in ("nodes", "tasks_per_node", "gpus_per_node"):
                try:
                    value = launcher.get(key)
                    problem = None if value is None or isinstance(value, int) else repr(value)
                except ValidationError as err:  # the schema's int check of ${trainer.devices}
                    problem = str(err).splitlines()[0]
                if problem:
                    raise SystemExit(
                        f"Error: hydra.launcher.{key} must be an integer ({problem}): with "
                        "hydra/launcher=slurm set trainer.devices=<GPUs per node> and "
                        "trainer.num_nodes=<nodes>."
                    )
        storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None) or ""
        if storage.startswith("sqlite:///"):
            database = Path(storage.removeprefix("sqlite:///"))
            _check_creatable(str(database.parent))
            database.parent.mkdir(parents=True, exist_ok=True)


def _check_output_root(config: DictConfig) -> None:
    root = OmegaConf.select(config, "paths.output_root")
    if not isinstance(root, str) or not root:
        raise SystemExit(
            f"Error: paths.output_root={root!r} is not allowed: it must be a folder path "
            "(default: outputs)."
        )


def _check_creatable(folder: str) -> None:
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(
            f"Error: cannot create the output folder {path}: {existing} is not a writable "
            "folder. Set paths.output_root=<a writable folder>."
        )


@contextmanager
def claim_slot(lock_dir: str | Path, slots: int, poll_s: float = 1.0) -> Iterator[int]:
    """Hold the first free one of ``slots`` lock files in ``lock_dir`` (waiting while all are
    held) and yield its number. The lock is the operating system's (``flock``), so a job that
    dies frees its slot."""
    folder = Path(lock_dir)
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for slot in range(slots):
            handle = open(folder / f"{slot}.lock", "w")  # noqa: SIM115 (held until released)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield slot
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(poll_s)


@contextmanager
def gpu_of_its_own(cfg: DictConfig) -> Iterator[None]:
    """Under ``hydra/launcher=joblib``, a one-GPU job gets a GPU that no other job of the sweep
    is using (``trainer.devices=[i]``); with more jobs than GPUs, the others wait for one."""
    launcher = OmegaConf.select(HydraConfig.get(), "launcher._target_", default="") or ""
    wanted = cfg.trainer.accelerator in ("gpu", "cuda", "auto") and cfg.trainer.devices == 1
    gpus = torch.cuda.device_count() if launcher.endswith("JoblibLauncher") and wanted else 0
    if not gpus:
        yield
        return
    with claim_slot(Path(HydraConfig.get().sweep.dir) / ".gpu_locks", gpus) as gpu:
        log.info(f"Job {HydraConfig.get().job.num} runs on GPU {gpu}")
        with read_write(cfg.trainer):
            cfg.trainer.accelerator, cfg.trainer.devices = "gpu", [gpu]
        yield
