"""Posterior-collapse diagnostics during validation."""

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

from vae_lightning.core.elbo import kl_per_dimension
from vae_lightning.core.posterior import active_units, mutual_information


class LatentUsage(L.Callback):
    """After each validation epoch, logs how much of the latent space q(z|x) uses:
    ``val/active_units`` (dimensions whose posterior mean varies over the images by more than
    ``active_threshold``), ``val/mutual_info`` (I(x; z) under q in nats, a batch estimate
    averaged over the batches) and, to W&B and TensorBoard, a histogram of the KL per latent
    dimension (``val/kl_per_dim``). Under DDP the sums are reduced over every rank."""

    def __init__(self, active_threshold: float = 0.01) -> None:
        super().__init__()
        if not isinstance(active_threshold, int | float) or active_threshold <= 0:
            raise ValueError(f"active_threshold={active_threshold!r}: it must be a number > 0")
        self.active_threshold = active_threshold
        self._sums: Tensor | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums = None

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        if trainer.sanity_checking:
            return
        mu, logvar = pl_module.vae.encode(batch[0])
        mu, logvar = mu.double(), logvar.double()
        z = pl_module.vae.reparameterize(mu, logvar)
        count = torch.full((1,), float(len(mu)), dtype=torch.float64, device=mu.device)
        sums = torch.cat(
            [
                count,
                (len(mu) * mutual_information(mu, logvar, z)).reshape(1),
                mu.sum(0),
                mu.pow(2).sum(0),
                kl_per_dimension(mu, logvar).sum(0),
            ]
        )
        self._sums = sums if self._sums is None else self._sums + sums

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._sums is None:
            return
        sums = self._sums
        if trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        count, mi_sum, rest = sums[0], sums[1], sums[2:]
        mu_sum, mu_sq_sum, kl_sum = rest.chunk(3)
        mu_variance = mu_sq_sum / count - (mu_sum / count).pow(2)
        active = active_units(mu_variance, self.active_threshold)
        # Already over every rank's images; sync_dist only tells Lightning so (it averages
        # the ranks' equal values).
        pl_module.log("val/active_units", float(active), on_epoch=True, sync_dist=True)
        pl_module.log("val/mutual_info", (mi_sum / count).float(), on_epoch=True, sync_dist=True)
        if trainer.is_global_zero:
            self._log_histogram(trainer, (kl_sum / count).float().cpu())

    @staticmethod
    def _log_histogram(trainer: L.Trainer, kl_per_dim: Tensor) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                histogram = wandb.Histogram(kl_per_dim.numpy())
                logger.log_metrics({"val/kl_per_dim": histogram}, step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram("val/kl_per_dim", kl_per_dim, trainer.global_step)
