"""Train a VAE on CIFAR-10: ``python -m vae_lightning.train [hydra overrides] [-m]``."""

import logging
import sys
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from vae_lightning.config import ConfigError, build, check_resume_checkpoint, validate_config
from vae_lightning.data import DatasetCorruptError, DatasetNotFoundError
from vae_lightning.loggers import finish_wandb_run
from vae_lightning.module import NonFiniteLossError
from vae_lightning.run import (
    JobFailed,
    check_plugins,
    flatten,
    gpu_of_its_own,
    is_multirun,
    isolated_ddp_job,
    last_checkpoint,
    register_resolvers,
    save_final_metrics,
    save_resolved_config,
)

log = logging.getLogger(__name__)

KNOWN_ERRORS = (
    ConfigError,
    MisconfigurationException,
    DatasetNotFoundError,
    DatasetCorruptError,
    PermissionError,
    NonFiniteLossError,
)
"""Errors whose message says what went wrong and what to do: shown without a traceback."""

_PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = str(
    next(p for p in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf") if p.is_dir())
)  # inside the package when installed from a wheel, beside it in a checkout
register_resolvers()  # ${sweep_group:} in conf/train.yaml


def train(cfg: DictConfig, wandb_run_id: str | None = None) -> dict[str, float]:
    """Fit on train/val, test the best checkpoint, and return the final metrics.

    ``wandb_run_id``: the W&B run to continue (when resuming from a checkpoint that names one).
    """
    L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = build(cfg, "data")
    model: L.LightningModule = build(cfg, "model", _recursive_=False)
    callbacks = [build(cfg, f"callbacks.{name}") for name in cfg.get("callbacks") or {}]
    loggers = [
        build(cfg, f"logger.{name}", id=wandb_run_id)
        if name == "wandb" and wandb_run_id
        else build(cfg, f"logger.{name}")
        for name in cfg.get("logger") or {}
    ]
    trainer: L.Trainer = build(cfg, "trainer", callbacks=callbacks, logger=loggers or False)

    if rank_zero_only.rank == 0:
        save_resolved_config(cfg, cfg.paths.output_dir)
    resolved = flatten(OmegaConf.to_container(cfg, resolve=True))
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)

    metrics: dict[str, float] = {}
    try:
        with isolated_ddp_job():
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
            metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
            checkpoint = trainer.checkpoint_callback
            if checkpoint and checkpoint.best_model_score is not None:
                metrics[f"{checkpoint.monitor}_best"] = float(checkpoint.best_model_score)
            if cfg.test:
                best = checkpoint.best_model_path if checkpoint else ""
                trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
                metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
    finally:
        finish_wandb_run()
    if rank_zero_only.rank == 0:
        save_final_metrics(metrics, cfg.paths.output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    if cfg.ckpt_path is None and (last := last_checkpoint(cfg.paths.output_dir)):
        log.info(f"Resuming from {last}, which this run's folder already holds (a requeued job)")
        cfg.ckpt_path = last
    try:
        validate_config(cfg)
        wandb_run_id = check_resume_checkpoint(cfg)
        with gpu_of_its_own(cfg):
            metrics = train(cfg, wandb_run_id)
    except KNOWN_ERRORS as err:
        invalid = isinstance(err, ConfigError | MisconfigurationException)
        message = f"{'Invalid configuration' if invalid else 'Error'}: {err}"
        if is_multirun():  # fail this job only: the sweep goes on (see RecordFailedJobs)
            raise JobFailed(message) from None
        raise SystemExit(message) from None
    log.info(f"Run folder: {cfg.paths.output_dir}")
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    check_plugins(sys.argv[1:])
    main()
