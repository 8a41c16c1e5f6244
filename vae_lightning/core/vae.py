"""The VAE: q(z|x) = N(mu, diag sigma_q^2), p(z) = N(0, I), p(x|z) = N(x_hat(z), sigma^2 I).

``VAE.elbo_terms`` is the one place where a batch's ELBO is assembled (training loss, reported
log-likelihood, KL, ELBO, bits/dim); ``VAE.log_likelihood`` is the one decoder likelihood that
it and the log p(x) estimators score images with.
"""

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from vae_lightning.core.elbo import (
    bits_per_dim,
    kl_per_dimension,
    log_likelihood_from_squared_error,
    squared_error,
)

SigmaMode = Literal["fixed", "learned", "optimal"]
SIGMA_MODES: tuple[str, ...] = ("fixed", "learned", "optimal")
SIGMA_MIN = 1e-3
"""Floor on the decoder sigma in every mode, so that log sigma stays finite."""


class VAEOutput(NamedTuple):
    x_hat: Tensor
    mu: Tensor
    logvar: Tensor
    z: Tensor


class ELBOTerms(NamedTuple):
    """Per image (each of shape ``(B,)``): the training ``loss`` (beta-weighted KL, fitted sigma),
    and the reported ``log_likelihood`` log p(x|z) (model sigma, every constant), ``kl``,
    ``elbo`` = log_likelihood - kl (beta = 1), ``bpd``, and the ``squared_error``."""

    loss: Tensor
    log_likelihood: Tensor
    kl: Tensor
    elbo: Tensor
    bpd: Tensor
    squared_error: Tensor


class VAE(nn.Module):
    """Encoder, reparameterized sampling, decoder, and the decoder's standard deviation sigma.

    ``sigma_mode`` chooses how sigma is set: ``fixed`` keeps ``sigma``; ``learned`` trains a single
    log sigma by gradient, starting at ``sigma``; ``optimal`` fits sigma^2 = per-image MSE in the
    training loss (the calibrated decoder) and keeps a running mean of the training MSE as the
    data-independent sigma used for reported likelihoods.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent_dim: int,
        sigma: float = 0.1,
        sigma_mode: SigmaMode = "fixed",
        sigma_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        if sigma_mode not in SIGMA_MODES:
            raise ValueError(f"sigma_mode must be one of {SIGMA_MODES}, got {sigma_mode!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.latent_dim = latent_dim
        self.sigma_mode = sigma_mode
        self.sigma_momentum = sigma_momentum
        log_sigma = torch.tensor(math.log(sigma))
        if sigma_mode == "learned":
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance, each of shape ``(B, H)``."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        """z = mu + sigma_q * eps with eps ~ N(0, I): a sample that gradients flow through."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor) -> VAEOutput:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        return VAEOutput(self.decode(z), mu, logvar, z)

    def log_likelihood(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """``log p(x|z)`` per image for the decoder mean ``x_hat``, with the model's sigma."""
        return log_likelihood_from_squared_error(
            squared_error(x, x_hat), x[0].numel(), self.decoder_log_sigma()
        )

    def elbo_terms(self, x: Tensor, beta: float = 1.0, free_bits: float = 0.0) -> ELBOTerms:
        """The ELBO's terms for a batch ``x``, from one reparameterized posterior sample.

        ``free_bits`` (lambda, nats): the loss's KL is ``sum_j max(lambda, mean_batch KL_j)``
        (Kingma et al. 2016), so a latent dimension whose batch-mean KL is under the floor gets
        no gradient from it; the reported ``kl`` and ``elbo`` use the true KL. The networks may
        run in reduced precision (bf16 autocast); every reduction runs in the precision of
        ``x`` (fp32).
        """
        x_hat, mu, logvar, _ = self(x)
        x_hat, mu, logvar = (
            t.to(torch.promote_types(t.dtype, x.dtype)) for t in (x_hat, mu, logvar)
        )
        num_dims = x[0].numel()
        sq_err = squared_error(x, x_hat)
        kl_per_dim = kl_per_dimension(mu, logvar)
        kl = kl_per_dim.sum(dim=1)
        if free_bits > 0:
            loss_kl = kl_per_dim.mean(dim=0).clamp_min(free_bits).sum().expand_as(kl)
        else:
            loss_kl = kl
        log_sigma = self.fitted_log_sigma(sq_err, num_dims)
        recon = 0.5 * sq_err * torch.exp(-2.0 * log_sigma)
        if self.sigma_mode != "fixed":
            recon = recon + num_dims * log_sigma  # a constant only when sigma is fixed
        log_px_z = log_likelihood_from_squared_error(sq_err, num_dims, self.decoder_log_sigma())
        elbo = log_px_z - kl
        return ELBOTerms(
            loss=recon + beta * loss_kl,
            log_likelihood=log_px_z,
            kl=kl,
            elbo=elbo,
            bpd=bits_per_dim(elbo, num_dims),
            squared_error=sq_err,
        )

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Decoder means for z drawn from the prior N(0, I)."""
        z = torch.randn(
            num_samples,
            self.latent_dim,
            generator=generator,
            device=self.log_sigma.device,
            dtype=self.log_sigma.dtype,
        )
        return self.decode(z)

    def decoder_log_sigma(self) -> Tensor:
        """The model's log sigma: what every reported likelihood uses (independent of the data)."""
        return self.log_sigma.clamp_min(math.log(SIGMA_MIN))

    def fitted_log_sigma(self, squared_error: Tensor, num_dims: int) -> Tensor:
        """Log sigma for the training loss: per image ``0.5 log MSE`` in ``optimal`` mode."""
        if self.sigma_mode != "optimal":
            return self.decoder_log_sigma()
        return 0.5 * torch.log((squared_error / num_dims).clamp_min(SIGMA_MIN**2))

    @torch.no_grad()
    def update_running_sigma(self, batch_mse: Tensor) -> None:
        """In ``optimal`` mode, move sigma^2 towards ``batch_mse``, the batch's mean per-pixel
        squared error (under DDP, the global batch's, so that every rank keeps the same sigma)."""
        if self.sigma_mode != "optimal":
            return
        variance = torch.exp(2.0 * self.log_sigma)
        variance = variance + self.sigma_momentum * (batch_mse - variance)
        self.log_sigma.copy_(0.5 * torch.log(variance))
