"""Train a VAE on CIFAR-10: ``python -m vae_lightning.train [hydra overrides] [-m]``."""

import logging
import sys

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vae_lightning.cli import (
    CONFIG_DIR,
    one_line_errors,
    quiet_third_party_warnings,
    register_resolvers,
)
from vae_lightning.config import build, check_resume_checkpoint, validate_config
from vae_lightning.errors import ConfigError
from vae_lightning.launch.ddp import isolated_ddp_job
from vae_lightning.launch.gpu_slots import gpu_of_its_own
from vae_lightning.launch.plugins import check_plugins
from vae_lightning.launch.run_files import (
    flatten,
    last_checkpoint,
    save_final_metrics,
    save_hardware,
    save_resolved_config,
)
from vae_lightning.training.fit_clock import FitClock
from vae_lightning.training.lit_module import VAELitModule
from vae_lightning.training.loggers import FallbackWandbLogger, finish_wandb_run
from vae_lightning.training.progress_bars import test_line

log = logging.getLogger(__name__)

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

    if rank_zero_only.rank == 0:  # a missing or damaged dataset stops here, before DDP starts
        datamodule.prepare_data()
        datamodule.setup("fit" if not cfg.test else None)
        check_batch_size(cfg, len(datamodule.train_set))
    metrics: dict[str, float] = {}
    try:
        with isolated_ddp_job():
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
            metrics |= fit_figures(model, trainer)
            metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
            if cfg.test:
                checkpoint = trainer.checkpoint_callback
                best = checkpoint.best_model_path if checkpoint else ""
                trainer.test(
                    model,
                    datamodule=datamodule,
                    ckpt_path=best or None,
                    weights_only=True,
                    verbose=False,
                )
                metrics |= {k: float(v) for k, v in trainer.callback_metrics.items()}
                if rank_zero_only.rank == 0:
                    log.info(test_line(metrics))
            for logger in trainer.loggers:
                if isinstance(logger, FallbackWandbLogger):
                    logger.log_summary(metrics)
    finally:
        finish_wandb_run()
    if rank_zero_only.rank == 0:
        save_final_metrics(metrics, cfg.paths.output_dir)
        save_hardware(trainer, cfg.paths.output_dir)
    return metrics


def check_batch_size(cfg: DictConfig, train_images: int) -> None:
    """Refuse a batch larger than the training set: it would train on one short batch an epoch
    (and a large one may not fit in memory)."""
    if cfg.data.batch_size > train_images:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is larger than the training set "
            f"({train_images} images once data.val_fraction={cfg.data.val_fraction} went to "
            f"validation): use data.batch_size={train_images} or less."
        )


def fit_figures(model: VAELitModule, trainer: L.Trainer) -> dict[str, float]:
    """What a fit cost: the model's parameters and, timed by ``FitClock`` (unless it is
    switched off), its wall time and the training images (of all ranks) per second of it; a
    resumed run's figures include the runs it resumes."""
    figures = {"num_params": float(sum(p.numel() for p in model.parameters()))}
    for clock in (c for c in trainer.callbacks if isinstance(c, FitClock)):
        figures["fit_seconds"] = clock.seconds
        figures["images_per_second"] = model.images_trained / clock.seconds
    return figures


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_third_party_warnings()
    if cfg.ckpt_path is None and (last := last_checkpoint(cfg.paths.output_dir)):
        log.info(f"Resuming from {last}, which this run's folder already holds (a requeued job)")
        cfg.ckpt_path = last
    with one_line_errors():
        validate_config(cfg)
        wandb_run_id = check_resume_checkpoint(cfg)
        with gpu_of_its_own(cfg):
            metrics = train(cfg, wandb_run_id)
    if rank_zero_only.rank == 0:
        log.info(f"Run folder: {cfg.paths.output_dir}")
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    check_plugins(sys.argv[1:])
    main()
