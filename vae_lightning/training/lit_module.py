"""The LightningModule: a VAE, its training loss, and the honest per-split metrics."""

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MeanMetric

from vae_lightning.core.kl_schedule import KLSchedule
from vae_lightning.core.vae import VAE
from vae_lightning.training.checkpoint_format import LIKELIHOOD_KINDS, checkpoint_best
from vae_lightning.training.step_rows import DeviceRows, is_reading_step

log = logging.getLogger(__name__)

METRICS = ("loss", "recon_mse", "kl", "elbo", "bpd")
"""Logged as ``{split}/{name}``: loss (training objective), recon_mse (per pixel), kl and elbo
(nats per image), bpd (bits per dimension of the 8-bit image from the ELBO: a code length with
a discrete likelihood, the dequantized bound with a density)."""
UNITS = {
    "loss": "nats/image",
    "recon_mse": "per pixel",
    "kl": "nats/image",
    "elbo": "nats/image",
    "bpd": "bits/dim",
}
"""The unit of each of ``METRICS``, for tables, plots and log lines."""


def _to_plain(config: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return dict(config)


DIVERGED_BPD = 1.0
"""Warn once when a validation's bpd lies this far above the run's best (its noise between
epochs is 0.01 to 0.05 bpd): the run has diverged, with or without a NaN."""


FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
"""Optimizers with a fused kernel on CUDA and CPU that takes a ``found_inf`` flag."""


class VAELitModule(L.LightningModule):
    """Trains a VAE by minimizing ``-log p(x|z) + beta * KL`` per image (or the negative IWAE
    bound with ``objective="iwae"`` and ``iwae_samples`` = K).

    ``arch`` holds ``encoder`` and ``decoder`` configs (``_target_`` + kwargs, without the latent
    size) and optionally ``channels_last`` (convolutions in NHWC layout, faster on GPUs);
    ``optimizer`` is a partial optimizer config, so the module is rebuilt from its checkpoint's
    hyperparameters alone; ``scheduler``, when set, a partial learning-rate scheduler config,
    stepped once per epoch (``ReduceLROnPlateau`` on ``val/loss``). ``likelihood`` is the
    likelihood head's config (``_target_`` + kwargs, a ``LikelihoodHead``);
    ``likelihood_shortcuts`` are the settings a ``model/likelihood`` file
    puts beside it so that each is one short key to override (``model.sigma``): the head reads
    them by interpolation, and the module keeps them only among its hyperparameters.
    ``compile`` compiles encoder, decoder and likelihood with ``torch.compile``
    (``VAE.compile``). ``kl_schedule`` varies beta over the steps (``KLSchedule``), and
    ``free_bits`` floors each latent dimension's KL in the loss. ``update_finite`` tells the
    update guards (``UpdateGuards``, a callback) whether the losses of the update in progress
    were finite on every rank.
    """

    def __init__(
        self,
        arch: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        latent_dim: int = 32,
        likelihood: Mapping[str, Any] | None = None,
        objective: str = "elbo",
        iwae_samples: int = 8,
        beta: float = 1.0,
        kl_schedule: Mapping[str, Any] | None = None,
        free_bits: float = 0.0,
        compile: bool = False,
        scheduler: Mapping[str, Any] | None = None,
        **likelihood_shortcuts: Any,
    ) -> None:  # pragma: no mutate block
        super().__init__()
        # Plain containers, so that checkpoints load with torch.load(weights_only=True).
        arch, optimizer = _to_plain(arch), _to_plain(optimizer)
        scheduler = _to_plain(scheduler) if scheduler else None
        kl_schedule = _to_plain(kl_schedule or {})
        likelihood = _to_plain(likelihood or {"_target_": LIKELIHOOD_KINDS["gaussian"]})
        self.save_hyperparameters(logger=False)  # reads the arguments' current local values
        head = instantiate(likelihood)
        self.vae = VAE(
            encoder=instantiate(arch["encoder"], latent_dim=latent_dim),
            decoder=instantiate(
                arch["decoder"], latent_dim=latent_dim, out_channels=head.out_channels
            ),
            latent_dim=latent_dim,
            likelihood=head,
        )
        self.iwae_samples = iwae_samples if objective == "iwae" else None
        self.beta = beta
        self.kl_schedule = KLSchedule(**kl_schedule)
        self.free_bits = free_bits
        # Per batch on the device: its metric sums over the global batch, and its images.
        self._step_names: list[str] = []
        self._steps: DeviceRows | None = None
        self._update_start = 0  # the first of _steps that belongs to the update in progress
        self.update_finite: Tensor | None = None  # its losses so far were finite on every rank
        self._update_sums: Tensor | None = None  # its batches' sums so far
        self._stepped = False
        self._logged = False  # train/* values were logged at the last step
        # On the host, since the last logging step: metric sums and images.
        self._window: dict[str, float] = {}
        self._window_images = 0.0
        self._warned_diverged = False
        self.channels_last = bool(arch.get("channels_last", False))
        if self.channels_last:
            self.vae.to(memory_format=torch.channels_last)
        if compile:
            self.vae.compile()
        else:  # the model summary runs it once, for each layer's sizes and FLOPs
            self.example_input_array = torch.zeros(1, 3, 32, 32)
        self.best_val_bpd = math.inf  # over the run's validations, resumes included
        self._images_trained = 0
        self.eval_metrics = nn.ModuleDict(
            {f"{split}_{name}": MeanMetric() for split in ("val", "test") for name in METRICS}
        )

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction: the mean of p(x|z) at the posterior mean z = mu. Deterministic, so
        that the model summary's example pass (its sizes and FLOPs) and the image grids draw
        nothing from the training run's random stream."""
        return self.vae(x)

    def compute_terms(self, x: Tensor, iwae_samples: int | None = None) -> dict[str, Tensor]:
        """Per-image loss and metrics (each of shape ``(B,)``) for a batch in [0, 1]; the loss
        is the negative IWAE bound with ``iwae_samples``."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        terms = self.vae.elbo_terms(x, self.current_beta(), self.free_bits, iwae_samples)
        sigma = {} if terms.sigma is None else {"sigma": terms.sigma}
        return {
            **sigma,
            "loss": terms.loss,
            "recon_mse": terms.squared_error / x[0].numel(),
            "kl": terms.kl,
            "elbo": terms.elbo,
            "bpd": terms.bpd,
            "squared_error": terms.squared_error,
        }

    @property
    def images_trained(self) -> int:
        """Training images of all ranks so far, those of the runs this one resumes included."""
        return self._images_trained

    def current_beta(self) -> float:
        """The KL weight of the training loss at this step (``model.kl_schedule``)."""
        return self.beta_at(self.global_step)

    def beta_at(self, step: int) -> float:
        """The KL weight of the training loss at optimizer step ``step``."""
        if self._trainer is None:  # outside a fit: the full weight
            return self.beta
        # a cyclical schedule spans the run (one without an end is refused in validate_config)
        cyclical = self.kl_schedule.kind == "cyclical"
        total = self.trainer.estimated_stepping_batches if cyclical else math.inf
        return self.kl_schedule(step, self.beta, total)

    def on_fit_start(self) -> None:  # pragma: no mutate block
        """Give each DDP rank a noise stream of its own (posterior samples, dequantization,
        flips): all ranks start from the same seed, so they would otherwise draw the same noise
        for their images. The weights are the same on every rank already (DDP broadcast them)."""
        if self.trainer.world_size > 1:
            seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
            torch.manual_seed((seed + 1_000_003 * self.global_rank) % 2**63)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """The loss of one batch. Its figures go to the device-side step record (``DeviceRows``)
        and reach the host, to be logged and checked, only at ``_read_steps``: nothing here
        waits for the device."""
        terms = self.compute_terms(batch[0], self.iwae_samples)
        loss = terms["loss"].mean()
        if self._steps is None:
            self._step_names = [name for name in (*METRICS, "sigma") if name in terms]
            self._steps = DeviceRows(len(self._step_names) + 1)
        with torch.no_grad():
            sums = self._global_sums(terms)
            finite = torch.isfinite(sums[0])  # on every rank
            self._steps.append(sums)
            if self.update_finite is not None:  # accumulating gradients
                finite = finite & self.update_finite
                sums = self._update_sums + sums
            self.update_finite, self._update_sums = finite, sums
        return loss

    def _global_sums(self, terms: dict[str, Tensor]) -> Tensor:
        """Each of ``_step_names`` summed over the global batch (all ranks' images, one
        all-reduce), then that batch's size."""
        per_image = [terms[name] for name in self._step_names]
        sums = torch.stack([*per_image, torch.ones_like(per_image[0])]).sum(dim=1)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        return sums

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        """The update's batches end here (the update guards, callbacks, decided on it first).
        Like the weights, sigma moves once per update, on all of its images, and only if all of
        their losses were finite."""
        with torch.no_grad():
            mse_sum = self._update_sums[self._step_names.index("recon_mse")]
            images = self._update_sums[-1]
            self.vae.likelihood.update_running_sigma(mse_sum, images, accept=self.update_finite)
        self.update_finite = self._update_sums = None
        self._update_start = len(self._steps)
        self._stepped = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """At the steps Lightning logs at (every ``trainer.log_every_n_steps``), read the steps
        since the last such step, act on non-finite losses and log the training metrics. At an
        epoch's or the run's last step, log their means so far without starting a new window:
        Lightning passes them to no logger there, but the progress line and the run's final
        metrics get them."""
        if not self._stepped:  # a batch that only accumulates gradients
            return
        self._stepped = False
        logging_step, last = is_reading_step(self.trainer, batch_idx)
        if logging_step or last:
            self._read_steps()
            self._log_window(new_window=logging_step)

    def on_train_epoch_end(self) -> None:
        self._read_steps()

    def on_train_end(self) -> None:
        self._read_steps()

    def _read_steps(self) -> None:
        """Bring the step records of the finished updates to the host (one copy): the finite
        steps join the next logged means and the images trained (a non-finite one is the update
        guards' to act on). Runs at each logging step, at each epoch's end and before each
        checkpoint is written."""
        rows = self._steps.take(self._update_start) if self._steps is not None else []
        self._update_start = 0
        names = self._step_names
        for _, values in rows:
            sums, images = values[: len(names)], values[-1]
            if not math.isfinite(sums[0]):
                continue
            for name, total in zip(names, sums, strict=True):
                self._window[name] = self._window.get(name, 0.0) + total
            self._window_images += images
            self._images_trained += round(images)

    def _log_window(self, new_window: bool) -> None:
        """Log ``train/*``: each metric's mean over the images of the finite steps since the
        last logging step, and the counters; then start a new window. Logged as CPU values, so
        that neither the loggers nor a progress bar reading them wait for the device."""
        values = {f"train/{k}": v / self._window_images for k, v in self._window.items()}
        if self.kl_schedule.kind != "constant":  # that of the last update, which is done
            values["train/beta"] = self.beta_at(self.global_step - 1)
        if new_window:
            self._window, self._window_images = {}, 0.0
        cpu = {name: torch.tensor(float(v), dtype=torch.float64) for name, v in values.items()}
        self.log_dict(cpu)  # per step, as Lightning logs in this hook
        self._logged = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:  # pragma: no mutate block
        """Drop the values logged at the last step from Lightning's result collection, once
        Lightning has passed them on: it would walk them at every step and log them again at
        its next logging step. ``trainer.callback_metrics`` keeps them."""
        if self._logged:
            self._logged = False
            for key, result in self.trainer._results.items():
                if key.startswith("on_train_batch_end.train/"):
                    result.reset()

    def on_train_start(self) -> None:  # pragma: no mutate block
        """Apply the configured optimizer settings (``model.optimizer.lr``, ...) to a resumed
        optimizer: loading its state from a checkpoint brings back the old ones. With a
        scheduler, the learning rate is the resumed schedule's."""
        scheduled = ("lr",) if self.hparams.get("scheduler") else ()
        settings = {
            k: v
            for k, v in self.hparams.optimizer.items()
            if not k.startswith("_") and k not in scheduled
        }
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                for key, value in settings.items():
                    value = tuple(value) if isinstance(value, list) else value
                    if key in group and group[key] != value:
                        log.info(f"model.optimizer.{key}={value} (the checkpoint had {group[key]})")
                        group[key] = value

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._read_steps()
        checkpoint["best_val_bpd"] = self.best_val_bpd
        checkpoint["images_trained"] = self.images_trained

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:  # pragma: no mutate block
        state = checkpoint["state_dict"]
        if "vae.log_sigma" in state:  # written before sigma moved into the likelihood head
            state["vae.likelihood.log_sigma"] = state.pop("vae.log_sigma")
        self.best_val_bpd = float(checkpoint.get("best_val_bpd", checkpoint_best(checkpoint)))
        self._images_trained = int(checkpoint.get("images_trained", 0))

    def _eval_step(self, batch: tuple[Tensor, Tensor], split: str) -> None:
        terms = self.compute_terms(batch[0])
        for name in METRICS:
            metric = self.eval_metrics[f"{split}_{name}"]
            metric.update(terms[name])
            prog_bar = split == "val" and name == "bpd"
            self.log(f"{split}/{name}", metric, prog_bar=prog_bar)  # per epoch, as by default

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        """Log ``val/bpd_best``, the lowest val/bpd so far, after every validation: what sweeps
        optimize and compare (W&B's early termination reads its history)."""
        if self.trainer.sanity_checking:
            return
        bpd = float(self.eval_metrics["val_bpd"].compute())  # equal on every rank
        self.best_val_bpd = min(self.best_val_bpd, bpd)
        self.log("val/bpd_best", self.best_val_bpd, sync_dist=True)
        self._warn_if_diverged(bpd)

    def _warn_if_diverged(self, bpd: float) -> None:  # pragma: no mutate block
        """Warn once when val/bpd lies DIVERGED_BPD above the run's best, unless a KL schedule
        still holds beta under its full value (a small beta lets the KL, and the bpd, grow)."""
        gap = bpd - self.best_val_bpd
        annealing = self.current_beta() < self.beta
        if gap < DIVERGED_BPD or annealing or self._warned_diverged or self.global_rank != 0:
            return
        self._warned_diverged = True
        best = [
            cb.best_model_path
            for cb in self.trainer.checkpoint_callbacks
            if cb.monitor == "val/bpd" and Path(cb.best_model_path or "").is_file()
        ]
        where = f" (checkpoint {best[0]})" if best else ""
        resume = ", or resume from that checkpoint (ckpt_path=...)," if best else ""
        log.warning(
            f"Training has diverged: val/bpd {bpd:.3f} at epoch {self.current_epoch} is "
            f"{gap:.2f} above the run's best, {self.best_val_bpd:.3f}{where}. Train again"
            f"{resume} with a lower model.optimizer.lr or gradients clipped by "
            "trainer.gradient_clip_val."
        )

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> Optimizer | dict[str, Any]:  # pragma: no mutate block
        """The configured optimizer, and its learning-rate scheduler (per epoch) when one is
        set; Adam, AdamW and SGD get their fused kernel on a GPU or CPU unless the config
        chooses (``model.optimizer.fused``, ``foreach``): one kernel for all parameters, which
        also skips an update on the device (``UpdateGuards``)."""
        make = instantiate(self.hparams.optimizer)
        fused = {}
        chosen = {"fused", "foreach"} & make.keywords.keys()
        if make.func in FUSED_OPTIMIZERS and not chosen and self.device.type in ("cuda", "cpu"):
            fused["fused"] = True
        optimizer = make(params=self.parameters(), **fused)
        if not self.hparams.get("scheduler"):
            return optimizer
        scheduler = instantiate(self.hparams.scheduler)(optimizer)
        schedule = {"scheduler": scheduler, "interval": "epoch", "monitor": "val/loss"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
