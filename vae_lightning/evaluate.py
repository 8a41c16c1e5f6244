"""Evaluate a trained VAE: ``python -m vae_lightning.evaluate ckpt_path=<checkpoint>``.

Writes ``eval.json`` and image grids to its output folder, prints a table, and logs to W&B.
"""

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from vae_lightning.cli import CONFIG_DIR
from vae_lightning.config import ConfigError, validate_eval_config
from vae_lightning.data.cifar10 import DatasetNotFoundError
from vae_lightning.evaluation.metrics import fid_metric, fid_scores, likelihood_metrics, save_grids
from vae_lightning.training.lit_module import VAELitModule
from vae_lightning.training.loggers import start_eval_run

log = logging.getLogger(__name__)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def print_table(results: dict[str, Any]) -> None:
    table = Table(title="Evaluation", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif isinstance(value, int | str):
            table.add_row(key, str(value))
    Console().print(table)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Every measurement of the issue, for the checkpoint ``cfg.ckpt_path``."""
    L.seed_everything(cfg.seed)
    device = _device(cfg.device)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = Path(cfg.ckpt_path).resolve()
    vae = VAELitModule.load_from_checkpoint(ckpt_path, map_location=device).vae.eval()
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    images = datamodule.test_set.tensors[0][: cfg.eval.limit]

    settings = cfg.eval
    started = time.perf_counter()
    results: dict[str, Any] = {"ckpt_path": str(ckpt_path)}
    results |= likelihood_metrics(
        vae,
        images,
        batch_size=settings.batch_size,
        num_samples=settings.num_samples,
        max_batch=settings.max_batch,
        dequantize=cfg.data.dequantize,
        grid_points=settings.grid_points,
        grid_limit=settings.grid_limit,
        active_threshold=settings.active_threshold,
    )
    results["likelihood_seconds"] = time.perf_counter() - started
    if settings.fid.enabled:
        metric = fid_metric(settings.fid.feature_extractor, settings.fid.inception_weights)
        if metric is not None:
            results |= fid_scores(metric, vae, images, settings.batch_size)
    grids = save_grids(
        vae, images, output_dir / "images", torch.tensor(results["mu_variance_per_dim"])
    )

    (output_dir / "eval.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    run = start_eval_run(
        ckpt_path.parent.parent,
        output_dir,
        settings.wandb_mode,
        OmegaConf.to_container(cfg, resolve=True),
    )
    if run is not None:
        import wandb

        scalars = {f"eval/{k}": v for k, v in results.items() if isinstance(v, int | float)}
        run.log(scalars | {f"eval/{p.stem}": wandb.Image(str(p)) for p in grids})
        run.summary.update(scalars)
        run.finish()
    log.info(f"Results: {output_dir / 'eval.json'}")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        validate_eval_config(cfg)
        evaluate(cfg)
    except ConfigError as err:
        raise SystemExit(f"Invalid configuration: {err}") from None
    except DatasetNotFoundError as err:
        raise SystemExit(f"Error: {err}") from None


if __name__ == "__main__":
    main()
