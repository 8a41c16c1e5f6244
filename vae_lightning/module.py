"""The LightningModule: a VAE, its training loss, and the honest per-split metrics."""

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torchmetrics import MeanMetric

from vae_lightning.elbo import (
    bits_per_dim,
    kl_to_standard_normal,
    log_likelihood_from_squared_error,
    squared_error,
)
from vae_lightning.model import VAE, SigmaMode

log = logging.getLogger(__name__)

METRICS = ("loss", "recon_mse", "kl", "elbo", "bpd")
"""Logged as ``{split}/{name}``: loss (training objective), recon_mse (per pixel), kl and elbo
(nats per image), bpd (bits per dimension of the 8-bit image, a bound from the ELBO)."""


def _to_plain(config: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class VAELitModule(L.LightningModule):
    """Trains a VAE by minimizing ``||x - x_hat||^2 / (2 sigma^2) + beta * KL`` per image.

    ``arch`` holds ``encoder`` and ``decoder`` configs (``_target_`` + kwargs, without the latent
    size) and optionally ``channels_last`` (convolutions in NHWC layout, faster on GPUs);
    ``optimizer`` is a partial optimizer config, so the module is rebuilt from its checkpoint's
    hyperparameters alone. ``compile`` compiles encoder and decoder with ``torch.compile``.
    A NaN or infinite loss stops training with ``NonFiniteLossError`` (``nonfinite_loss="stop"``)
    or skips that step on every rank (``"skip"``).
    """

    def __init__(
        self,
        arch: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        latent_dim: int = 32,
        sigma: float = 0.1,
        sigma_mode: SigmaMode = "fixed",
        beta: float = 1.0,
        compile: bool = False,
        nonfinite_loss: str = "stop",
    ) -> None:
        super().__init__()
        # Plain containers, so that checkpoints load with torch.load(weights_only=True).
        arch, optimizer = _to_plain(arch), _to_plain(optimizer)
        self.save_hyperparameters(logger=False)  # reads the arguments' current local values
        self.vae = VAE(
            encoder=instantiate(arch["encoder"], latent_dim=latent_dim),
            decoder=instantiate(arch["decoder"], latent_dim=latent_dim),
            latent_dim=latent_dim,
            sigma=sigma,
            sigma_mode=sigma_mode,
        )
        self.beta = beta
        self.nonfinite_loss = nonfinite_loss
        self.channels_last = bool(arch.get("channels_last", False))
        if self.channels_last:
            self.vae.to(memory_format=torch.channels_last)
        if compile:  # in place: the state dict keeps its keys
            self.vae.encoder.compile()
            self.vae.decoder.compile()
        self.eval_metrics = nn.ModuleDict(
            {f"{split}_{name}": MeanMetric() for split in ("val", "test") for name in METRICS}
        )

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction: the decoder mean for one posterior sample."""
        return self.vae(x).x_hat

    def compute_terms(self, x: Tensor) -> dict[str, Tensor]:
        """Per-image loss and metrics (each of shape ``(B,)``) for a batch in [0, 1].

        The networks may run in reduced precision (bf16 autocast); every reduction runs in fp32.
        """
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x_hat, mu, logvar, _ = self.vae(x)
        x_hat, mu, logvar = (
            t.to(torch.promote_types(t.dtype, x.dtype)) for t in (x_hat, mu, logvar)
        )
        num_dims = x[0].numel()
        sq_err = squared_error(x, x_hat)
        kl = kl_to_standard_normal(mu, logvar)

        log_sigma = self.vae.fitted_log_sigma(sq_err, num_dims)
        recon = 0.5 * sq_err * torch.exp(-2.0 * log_sigma)
        if self.vae.sigma_mode != "fixed":
            recon = recon + num_dims * log_sigma  # a constant only when sigma is fixed
        log_px_z = log_likelihood_from_squared_error(sq_err, num_dims, self.vae.decoder_log_sigma())
        elbo = log_px_z - kl
        return {
            "loss": recon + self.beta * kl,
            "recon_mse": sq_err / num_dims,
            "kl": kl,
            "elbo": elbo,
            "bpd": bits_per_dim(elbo, num_dims),
            "squared_error": sq_err,
        }

    def on_fit_start(self) -> None:
        """Give each DDP rank a noise stream of its own (posterior samples, dequantization,
        flips): all ranks start from the same seed, so they would otherwise draw the same noise
        for their images. The weights are the same on every rank already (DDP broadcast them)."""
        if self.trainer.world_size > 1:
            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
            torch.manual_seed((seed + 1_000_003 * self.global_rank) % 2**63)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x = batch[0]
        terms = self.compute_terms(x)
        self.vae.update_running_sigma(terms["squared_error"], x[0].numel())
        self.log_dict(self._global_batch_means(terms), on_step=True, on_epoch=False)
        loss = terms["loss"].mean()
        if self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True):
            return loss
        if self.nonfinite_loss == "skip":
            log.warning(f"Non-finite loss at step {self.global_step}: step skipped.")
            return None
        last = self._last_checkpoint()
        what_now = (
            f"the last good checkpoint is {last}: resume from it (ckpt_path=...) with"
            if last
            else "no checkpoint was written yet: restart with"
        )
        raise NonFiniteLossError(
            f"The loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
            f"{what_now} a lower model.optimizer.lr, or set model.nonfinite_loss=skip."
        )

    def _global_batch_means(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """``train/{name}`` means over the global batch (all ranks' images, one all-reduce of
        the sums and the count), and ``train/sigma``."""
        per_rank = [terms[name].detach().sum() for name in METRICS]
        count = torch.full((), float(terms["loss"].numel()), device=per_rank[0].device)
        sums = torch.stack([*per_rank, count]).float()
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        means = {
            f"train/{name}": total / sums[-1]
            for name, total in zip(METRICS, sums[:-1], strict=True)
        }
        means["train/sigma"] = self.vae.decoder_log_sigma().detach().exp()
        return means

    def _last_checkpoint(self) -> str | None:
        paths = [
            Path(p)
            for cb in self.trainer.checkpoint_callbacks
            for p in (cb.best_model_path, cb.last_model_path)
            if p and Path(p).is_file()
        ]
        return str(max(paths, key=lambda p: p.stat().st_mtime)) if paths else None

    def _eval_step(self, batch: tuple[Tensor, Tensor], split: str) -> None:
        terms = self.compute_terms(batch[0])
        for name in METRICS:
            metric = self.eval_metrics[f"{split}_{name}"]
            metric.update(terms[name])
            self.log(f"{split}/{name}", metric, on_step=False, on_epoch=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The configured optimizer; Adam and AdamW get the fused CUDA kernel on a GPU."""
        make = instantiate(self.hparams.optimizer)
        fused = {}
        if make.func in (torch.optim.Adam, torch.optim.AdamW) and "fused" not in make.keywords:
            fused["fused"] = self.device.type == "cuda"
        return make(params=self.parameters(), **fused)
