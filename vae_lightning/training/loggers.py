"""Loggers for runs that may stop and resume: a W&B logger that never prompts, goes offline by
itself when it cannot log online (at the start or in the middle of a run), joins the run a W&B
sweep agent started, and summarizes each run by the numbers runs are compared by; and a CSV
logger that appends when a run resumes in its own folder."""

import csv
import logging
import netrc
import os
import secrets
import socket
import string
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from vae_lightning.errors import ConfigError
from vae_lightning.files import read_run_file

log = logging.getLogger(__name__)

WANDB_MODES = ("auto", "online", "offline", "disabled")
BEST_OF = {"val/bpd": "min", "val/elbo": "max"}
"""Metrics whose W&B summary is their best value over the run rather than their last."""


def check_wandb_settings(mode: str, log_model: bool | str = False) -> None:
    """``logger.wandb.mode`` is one of ``WANDB_MODES``; ``logger.wandb.log_model`` is false,
    true (checkpoints as artifacts at the end) or all."""
    if mode not in WANDB_MODES:
        raise ConfigError(
            f"logger.wandb.mode={mode!r} is not allowed: logger.wandb.mode must be one of "
            f"{', '.join(WANDB_MODES)}."
        )
    if not (isinstance(log_model, bool) or log_model == "all"):
        raise ConfigError(
            f"logger.wandb.log_model={log_model!r} is not allowed: logger.wandb.log_model must "
            "be false, true or all."
        )


def _wandb_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""


def has_wandb_api_key() -> bool:
    """True when ``WANDB_API_KEY`` is set or ``wandb login`` stored a key in the netrc file."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        entry = netrc.netrc(path).authenticators(_wandb_host())
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def is_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def resolve_wandb_mode(mode: str = "auto") -> tuple[str, str | None]:
    """The W&B mode to use and, when ``auto`` falls back to offline, the reason why.

    ``WANDB_MODE`` in the environment wins; ``auto`` means online only with an API key and a
    reachable server.
    """
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], None
    if mode != "auto":
        return mode, None
    if not has_wandb_api_key():
        return "offline", "no API key (set WANDB_API_KEY or run `wandb login`)"
    if not is_reachable(_wandb_host()):
        return "offline", f"{_wandb_host()} cannot be reached"
    return "online", None


def choose_wandb_mode(mode: str, save_dir: str | Path) -> str:
    """``resolve_wandb_mode``, saying in one line (rank 0) when and why it goes offline."""
    check_wandb_settings(mode)
    mode, reason = resolve_wandb_mode(mode)
    if reason and rank_zero_only.rank == 0:
        log.warning(
            f"W&B: {reason}; logging offline. Upload later with: "
            f"wandb sync {Path(save_dir) / 'wandb'}/offline-run-*"
        )
    return mode


class FallbackWandbLogger(WandbLogger):
    """A ``WandbLogger`` that keeps training going when logging to W&B fails mid-run (its
    service died, the connection broke in a way wandb raises on): it says so once and goes on
    with the same run id offline, under ``save_dir/wandb_fallback`` (``wandb sync`` uploads it
    later).
    If even that fails, W&B logging stops for this run; training never does."""

    _fallen_back = False
    _disabled = False
    _summarized_run = None

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        # Lightning passes anonymous=None, which wandb warns about at every start
        self._wandb_init.pop("anonymous", None)

    @property
    def experiment(self):
        """The W&B run, with ``BEST_OF`` defined on it once (again after going offline)."""
        run = super().experiment
        if rank_zero_only.rank == 0 and run is not self._summarized_run:
            self._summarized_run = run
            for name, best in BEST_OF.items():
                run.define_metric(name, summary=best, step_metric="trainer/global_step")
        return run

    @rank_zero_only
    def log_summary(self, metrics: Mapping[str, float]) -> None:
        """Put the run's final numbers into its W&B summary (the metrics of ``BEST_OF`` keep
        their best value)."""
        values = {k: v for k, v in metrics.items() if k not in BEST_OF}
        self._guarded(lambda: self.experiment.summary.update(values))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._guarded(super().log_metrics, metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self._guarded(super().log_hyperparams, params)

    def _guarded(self, log_call: Callable[..., None], *args: Any) -> None:
        if self._disabled:
            return
        try:
            log_call(*args)
            return
        except Exception as err:
            failure = err
        if not self._fallen_back:
            self._fallen_back = True
            try:
                self._restart_offline(failure)
                log_call(*args)
                return
            except Exception as err:
                failure = err
        self._disabled = True
        log.warning(f"W&B: logging failed again ({failure!r}); no more W&B logging in this run.")

    def _restart_offline(self, failure: Exception) -> None:
        run_id = self.version
        # a folder of its own: in the same second, wandb would reuse the failed run's folder
        fallback_dir = Path(self.save_dir or ".") / "wandb_fallback"
        fallback_dir.mkdir(parents=True, exist_ok=True)
        log.warning(
            f"W&B: logging failed ({failure!r}); training goes on and run {run_id} continues "
            f"offline. Upload it later with: wandb sync {fallback_dir}/wandb/offline-run-*"
        )
        failed_run = self._experiment
        try:
            if failed_run is not None:  # None: the run never started (its start timed out)
                failed_run.finish(exit_code=1)
        except Exception as err:
            log.warning(f"W&B: the failed run could not be closed ({err!r})")
        self._wandb_init.update(id=run_id, resume="allow", mode="offline", dir=str(fallback_dir))
        self._experiment = None
        try:
            self.experiment  # noqa: B018 (starts the offline run)
        except Exception:
            self._experiment = failed_run  # so that nothing tries to start a run again
            raise


class AppendingCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` (a requeued job resuming
    in its own folder) is appended to instead of deleted."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` writing through ``AppendingCSVWriter``."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingCSVWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingCSVWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_logger(
    project: str,
    save_dir: str,
    mode: str = "auto",
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    log_model: bool | str = False,
    **kwargs,
) -> WandbLogger:
    """A ``WandbLogger`` whose run lives under ``save_dir/wandb``; see ``resolve_wandb_mode``.

    Started by a W&B sweep agent (``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID`` set), it logs into
    the agent's run: the run id, project, name and group are the sweep's. The run id is fixed
    before W&B starts, so that a run that falls back to offline keeps it.
    """
    check_wandb_settings(mode, log_model)
    mode = choose_wandb_mode(mode, save_dir)
    sweep = os.environ.get("WANDB_SWEEP_ID")
    if sweep:
        project = os.environ.get("WANDB_PROJECT") or project
        name = group = None
        if mode != "online" and rank_zero_only.rank == 0:
            log.warning(
                f"W&B: this run belongs to sweep {sweep}, and a sweep needs W&B online; it "
                f"trains and logs {mode}, but the sweep will not receive its result."
            )
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # fixed now, so that an offline fallback keeps it
        kwargs["id"] = kwargs.get("id") or os.environ.get("WANDB_RUN_ID") or _new_run_id()
    return FallbackWandbLogger(
        project=project,
        save_dir=save_dir,
        name=None if sweep else name or "defaults",
        group=group,
        tags=list(tags),
        mode=mode,
        log_model=log_model,
        **kwargs,
    )


def _new_run_id() -> str:
    """Eight characters of [a-z0-9], as wandb makes them."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def finish_wandb_run() -> None:
    """End the current W&B run, if any, so that the next job of a multirun gets its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def start_eval_run(train_dir: Path, save_dir: Path, mode: str, config: dict[str, Any]):
    """A W&B run for an evaluation: the training run itself when it was online and can be
    resumed, else a new run (job_type ``eval``) in the training run's group. None if disabled."""
    mode = choose_wandb_mode(mode, save_dir)
    if mode == "disabled":
        return None
    import wandb

    config_file = train_dir / "config.yaml"
    train_config = read_run_file(config_file) if config_file.is_file() else {}
    settings = (train_config.get("logger") or {}).get("wandb") or {}
    project = settings.get("project", "vae_lightning")
    name = settings.get("name") or "defaults"
    online_runs = sorted((train_dir / "wandb").glob("run-*"))
    if mode == "online" and online_runs:
        run_id = online_runs[-1].name.rsplit("-", 1)[1]
        return wandb.init(project=project, id=run_id, resume="allow", dir=train_dir)
    return wandb.init(
        project=project,
        group=settings.get("group") or name,
        name=f"eval {name}",
        job_type="eval",
        dir=save_dir,
        mode=mode,
        config=config,
    )
