"""Evaluate a trained VAE: ``python -m vae_lightning.evaluate ckpt_path=<checkpoint>``.

Writes ``eval.json``, the config it ran with and image grids to its output folder, prints a
table, and logs to W&B.
"""

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from vae_lightning.cli import CONFIG_DIR, one_line_errors, quiet_third_party_warnings
from vae_lightning.config import build, validate_eval_config
from vae_lightning.evaluation.feature_networks import (
    FIDUnavailableError,
    build_extractor,
    network_batch_size,
)
from vae_lightning.evaluation.fid import DEFAULT_CACHE
from vae_lightning.evaluation.metrics import (
    fid_scores,
    likelihood_metrics,
    posterior_parameters,
    save_grids,
)
from vae_lightning.evaluation.samplers import LatentSampler, load_or_fit
from vae_lightning.files import file_digest, has_key, read_run_file, write_text_atomically
from vae_lightning.launch.plugins import check_plugins
from vae_lightning.launch.run_files import save_resolved_config
from vae_lightning.training.callbacks import GRID_CAPTIONS
from vae_lightning.training.checkpoints import load_model
from vae_lightning.training.lit_module import VAELitModule
from vae_lightning.training.loggers import start_eval_run

log = logging.getLogger(__name__)

EVALUATION_KEYS = ("eval", "paths", "ckpt_path", "trainer.accelerator")
"""Taken from this command's config whatever the training run had."""


def _raw(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def run_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The training run's resolved config (``config.yaml`` in the checkpoint's run folder) with
    ``EVALUATION_KEYS`` and every key or group the command line ``overrides`` set put over it.
    Without that file, this command's own defaults stand in for it (with a warning)."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    run_file = Path(cfg.ckpt_path).resolve().parent.parent / "config.yaml"
    if run_file.is_file():
        merged = OmegaConf.create(read_run_file(run_file, required=("data", "seed")))
    else:
        log.warning(
            f"No config.yaml in the checkpoint's run folder ({run_file.parent}): data, seed "
            "and logger settings are this command's defaults and the command line's."
        )
        merged = OmegaConf.create({key: raw[key] for key in ("data", "logger", "seed")})
    keys = list(EVALUATION_KEYS)
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group.replace("/", ".")
        keys.append(key)
        if key == "paths.data_dir":  # the run's data.data_dir is a resolved path
            keys.append("data.data_dir")
            raw["data"]["data_dir"] = "${paths.data_dir}"
    for key in filter(lambda key: has_key(raw, key), keys):  # a group may fill another key
        OmegaConf.update(merged, key, _raw(raw, key), merge=False)
    return merged


def _device(accelerator: str) -> torch.device:
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cpu" if accelerator == "cpu" else "cuda")


def grid_caption(name: str) -> str:
    """The W&B caption of the image grid ``name``."""
    if name in GRID_CAPTIONS:
        return GRID_CAPTIONS[name]
    return f"decoder means of latents from the {name.removeprefix('samples_')} sampler"


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


def fid_extractor(cfg: DictConfig) -> nn.Module | None:
    """The FID network of ``eval.fid``, checked before any pass; None (with one line) when FID
    is off, or its default network cannot be had."""
    fid = cfg.eval.fid
    if not fid.enabled:
        return None
    try:
        return build_extractor(fid.network, fid.feature_extractor, fid.inception_weights)
    except FIDUnavailableError as err:
        log.warning(f"FID skipped: {err}.")
        return None


def build_samplers(cfg: DictConfig, latent_dim: int) -> dict[str, LatentSampler]:
    """The samplers of ``eval.samplers`` (the ``sampler`` group), unfitted: built before any
    pass, so that a bad setting stops the evaluation at once."""
    samplers = cfg.eval.get("samplers") or {}
    return {name: build(cfg, f"eval.samplers.{name}", latent_dim=latent_dim) for name in samplers}


def fit_samplers(
    cfg: DictConfig, samplers: dict[str, LatentSampler], vae, checkpoint_digest: str
) -> dict[str, LatentSampler]:
    """Each sampler fitted to the posteriors of the run's training split (encoded once, for
    all), or read from ``samplers/<name>.pt`` in the output folder where it was fitted before
    with the same settings and checkpoint."""
    device = next(vae.parameters()).device
    posteriors: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_posteriors() -> tuple[torch.Tensor, torch.Tensor]:
        if not posteriors:
            datamodule = build(cfg, "data")
            datamodule.setup("fit")
            images = datamodule.train_set.tensors[0]
            posteriors.append(posterior_parameters(vae, images, cfg.data.batch_size))
        return posteriors[0]

    folder = Path(cfg.paths.output_dir) / "samplers"
    fitted = {}
    for name, sampler in samplers.items():
        key = {
            "checkpoint": checkpoint_digest,
            "settings": OmegaConf.to_container(cfg.eval.samplers[name], resolve=True),
        }
        generator = torch.Generator(device).manual_seed(cfg.seed)
        fitted[name] = load_or_fit(
            sampler.to(device), folder / f"{name}.pt", key, training_posteriors, generator
        )
    return fitted


def _fid(
    cfg: DictConfig,
    extractor: nn.Module,
    vae,
    images: torch.Tensor,
    samplers: dict[str, LatentSampler],
    checkpoint_digest: str,
) -> dict[str, Any]:
    """FID of each sampler's images and of reconstructions of the first
    ``eval.fid.num_samples`` test images (of those evaluated), against the training images
    and against those test images."""
    fid = cfg.eval.fid
    started = time.perf_counter()
    scores = fid_scores(
        extractor,
        vae,
        images[: fid.num_samples],
        samplers,
        OmegaConf.to_container(cfg.eval.samplers, resolve=True),
        cfg.data.data_dir,
        Path(fid.cache_dir) if fid.cache_dir else DEFAULT_CACHE,
        checkpoint_digest,
        cfg.seed,
        fid.batch_size or network_batch_size(next(vae.parameters()).device),
    )
    return {**scores, "fid_network": extractor.name, "fid_seconds": time.perf_counter() - started}


def evaluate(cfg: DictConfig, model: VAELitModule) -> dict[str, Any]:
    """Every measurement of ``vae_lightning.evaluation`` for ``model``, read from the checkpoint
    ``cfg.ckpt_path``, with ``cfg`` a training run's config (see ``run_config``)."""
    L.seed_everything(cfg.seed)
    device = _device(cfg.trainer.accelerator)
    output_dir = Path(cfg.paths.output_dir)
    save_resolved_config(cfg, output_dir)
    ckpt_path = Path(cfg.ckpt_path).resolve()
    vae = model.vae.to(device).eval()
    samplers = build_samplers(cfg, vae.latent_dim)
    extractor = fid_extractor(cfg)
    datamodule = build(cfg, "data")
    datamodule.prepare_data()
    datamodule.setup("test")
    images = datamodule.test_set.tensors[0][: cfg.eval.limit]

    settings = cfg.eval
    started = time.perf_counter()
    results: dict[str, Any] = {"ckpt_path": str(ckpt_path)}
    results |= likelihood_metrics(
        vae,
        images,
        batch_size=cfg.data.batch_size,
        num_samples=settings.num_samples,
        max_batch=settings.max_batch,
        dequantize=cfg.data.dequantize,
        grid_points=settings.grid_points,
        grid_limit=settings.grid_limit,
        active_threshold=settings.active_threshold,
        prior_sampling=settings.prior_sampling,
    )
    results["likelihood_seconds"] = time.perf_counter() - started
    fitted: dict[str, LatentSampler] = {}
    if extractor is not None:
        checkpoint_digest = file_digest(ckpt_path)
        fitted = fit_samplers(cfg, samplers, vae, checkpoint_digest)
        results |= _fid(cfg, extractor, vae, images, fitted, checkpoint_digest)
    mu_variance = torch.tensor(results["mu_variance_per_dim"])
    grids = save_grids(vae, images, output_dir / "images", mu_variance, fitted)

    write_text_atomically(output_dir / "eval.json", json.dumps(results, indent=2))
    print_table(results)
    wandb_mode = OmegaConf.select(cfg, "logger.wandb.mode", default=None) or "disabled"
    run = start_eval_run(
        ckpt_path.parent.parent,
        output_dir,
        wandb_mode,
        OmegaConf.to_container(cfg, resolve=True),
    )
    if run is not None:
        import wandb

        scalars = {f"eval/{k}": v for k, v in results.items() if isinstance(v, int | float)}
        images = {p.stem: wandb.Image(str(p), caption=grid_caption(p.stem)) for p in grids}
        run.log(scalars | {f"eval/{name}": image for name, image in images.items()})
        run.summary.update(scalars)
        run.finish()
    log.info(f"Results: {output_dir / 'eval.json'}")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    quiet_third_party_warnings()
    with one_line_errors():
        validate_eval_config(cfg)  # ckpt_path first: the run's config is found through it
        model = load_model(cfg.ckpt_path)
        cfg = run_config(cfg, list(HydraConfig.get().overrides.task))
        validate_eval_config(cfg)
        evaluate(cfg, model)


if __name__ == "__main__":
    check_plugins(sys.argv[1:])
    main()
