"""Hydra callbacks: checks before any job starts, and a record of the jobs that failed."""

import fcntl
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, ValidationError

from vae_lightning.launch.multirun import is_multirun

log = logging.getLogger(__name__)


class JobFailed(CompactHydraException):
    """A sweep job stopped for a reason its message explains: Hydra shows the message alone,
    without a traceback, when it reports the failed job at the end of the sweep."""


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
        record_failure(Path(hydra_cfg.sweep.dir) / "failed_jobs.yaml", entry)


def record_failure(path: Path, entry: dict[str, Any]) -> None:
    """Add ``entry`` to the list in ``path``. Jobs that fail at the same time (parallel
    launchers) take turns through an exclusive lock, and the list is replaced whole (written
    to a temporary file and renamed), so no entry is lost and no reader sees half a file."""
    with open(path.with_name(f".{path.stem}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        failed = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else []
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        OmegaConf.save(OmegaConf.create([*failed, entry]), partial)
        partial.replace(path)


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
