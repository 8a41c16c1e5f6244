"""The VAE: q(z|x) = N(mu, diag sigma_q^2), p(z) = N(0, I), and p(x|z) from a likelihood head
(``vae_lightning.core.likelihoods``) on the decoder's output.

``VAE.elbo_terms`` is the one place where a batch's ELBO (or IWAE bound) is assembled: training
loss, reported log-likelihood, KL, ELBO, bits/dim; ``VAE.log_likelihood`` is the one decoder
likelihood that the log p(x) estimators score images with.
"""

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from vae_lightning.core.elbo import (
    NUM_BINS,
    bits_per_dim,
    diagonal_normal_log_density,
    kl_per_dimension,
    squared_error,
)
from vae_lightning.core.likelihoods import GaussianLikelihood, ImageDistribution, LikelihoodHead


class ELBOTerms(NamedTuple):
    """Per image (each of shape ``(B,)``): the training ``loss`` (negative beta-ELBO or IWAE
    bound), and the reported ``log_likelihood`` log p(x|z) (the model's sigma, every constant),
    ``kl``, ``elbo`` = log_likelihood - kl (beta = 1), ``bpd``, the ``squared_error`` of the
    decoder mean, and ``sigma``, the mean decoder sigma over the pixels (None without one)."""

    loss: Tensor
    log_likelihood: Tensor
    kl: Tensor
    elbo: Tensor
    bpd: Tensor
    squared_error: Tensor
    sigma: Tensor | None


class ObservedTerms(NamedTuple):
    """Per image under p(x|z): ``log_prob`` log p(x|z), ``fit`` the log-density that the
    loss fits (the likelihood's ``loss_distribution``), the ``squared_error`` of the mean
    image, and ``sigma``, the mean decoder sigma over the pixels (None without one)."""

    log_prob: Tensor
    fit: Tensor
    squared_error: Tensor
    sigma: Tensor | None


class VAE(nn.Module):
    """Encoder, reparameterized sampling, decoder, and the decoder likelihood p(x|z).

    The decoder outputs ``likelihood.out_channels`` channels (3 for a Gaussian mean, 6 with a
    heteroscedastic sigma, 10 per component for the logistic mixture); the likelihood head
    turns them into a distribution with ``log_prob``, ``mean`` and ``sample``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent_dim: int,
        likelihood: LikelihoodHead | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.latent_dim = latent_dim
        self.likelihood = likelihood if likelihood is not None else GaussianLikelihood()

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance, each of shape ``(B, H)``."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    @staticmethod
    def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
        """z = mu + sigma_q * eps with eps ~ N(0, I): a sample that gradients flow through."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def observation_model(self, z: Tensor) -> ImageDistribution:
        """p(x|z) for latents ``z`` of shape ``(N, H)``: a distribution over N images."""
        return self.likelihood(self.decoder(z))

    def decode(self, z: Tensor) -> Tensor:
        """The mean image of p(x|z)."""
        return self.observation_model(z).mean

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction of ``x``: the mean of p(x|z) at the posterior mean z = mu."""
        return self.decode(self.encode(x)[0])

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """``log p(x|z)`` per image, with the model's sigma and every constant."""
        return self.observation_model(z).log_prob(x)

    def bits_per_dim(self, log_px: Tensor, num_dims: int) -> Tensor:
        """Bits/dim of the 8-bit image from a log p(x) (or a bound on it) in nats over
        ``num_dims`` dimensions: a code length for a discrete likelihood, the dequantized bound
        for a density."""
        return bits_per_dim(log_px, num_dims, 1 if self.likelihood.discrete else NUM_BINS)

    @property
    def bpd_kind(self) -> str:
        """What ``bits_per_dim`` is, which rows of one table must not be compared across."""
        return "code length" if self.likelihood.discrete else "dequantized bound"

    def elbo_terms(
        self,
        x: Tensor,
        beta: float = 1.0,
        free_bits: float = 0.0,
        iwae_samples: int | None = None,
    ) -> ELBOTerms:
        """The ELBO's terms for a batch ``x``, from one reparameterized posterior sample, or
        from ``iwae_samples`` = K of them with the IWAE bound as the loss (beta = 1, no free
        bits; the reported terms are then the K-sample means).

        ``free_bits`` (lambda, nats): the loss's KL is ``sum_j max(lambda, mean_batch KL_j)``
        (Kingma et al. 2016), so a latent dimension whose batch-mean KL is under the floor gets
        no gradient from it; the reported ``kl`` and ``elbo`` use the true KL. The networks may
        run in reduced precision (bf16 autocast); every reduction runs in the precision of
        ``x`` (fp32).
        """
        mu, logvar = (t.to(torch.promote_types(t.dtype, x.dtype)) for t in self.encode(x))
        k = iwae_samples or 1
        z = mu + torch.exp(0.5 * logvar) * torch.randn(
            (k, *mu.shape), device=mu.device, dtype=mu.dtype
        )
        out = self.decoder(z.flatten(0, 1))
        out = out.to(torch.promote_types(out.dtype, x.dtype))
        x_k = x if k == 1 else x.expand(k, *x.shape).flatten(0, 1)
        log_px_z, fit, error, sigma = self.observed_terms(out, x_k)
        kl_per_dim = kl_per_dimension(mu, logvar)
        kl = kl_per_dim.sum(dim=1)
        if iwae_samples is not None:
            log_w = log_px_z.view(k, -1) + diagonal_normal_log_density(z, 0.0, 0.0)
            log_w = log_w - diagonal_normal_log_density(z, mu, logvar)
            loss = math.log(k) - torch.logsumexp(log_w, dim=0)
        else:
            loss_kl = (
                kl_per_dim.mean(dim=0).clamp_min(free_bits).sum().expand_as(kl)
                if free_bits > 0
                else kl
            )
            loss = -fit + beta * loss_kl
        log_px_z = log_px_z.view(k, -1).mean(dim=0)
        elbo = log_px_z - kl
        return ELBOTerms(
            loss=loss,
            log_likelihood=log_px_z,
            kl=kl,
            elbo=elbo,
            bpd=self.bits_per_dim(elbo, x[0].numel()),
            squared_error=error.view(k, -1).mean(dim=0),
            sigma=None if sigma is None else sigma.view(k, -1).mean(dim=0),
        )

    def observed_terms(self, out: Tensor, x: Tensor) -> ObservedTerms:
        """The decoder likelihood's per-image terms for decoder outputs ``out`` and images
        ``x``: the per-pixel work of a training step, which ``compile`` fuses."""
        p_x = self.likelihood(out)
        log_prob = p_x.log_prob(x)
        p_loss = self.likelihood.loss_distribution(p_x, x)
        sigma = p_x.scale
        return ObservedTerms(
            log_prob=log_prob,
            fit=log_prob if p_loss is p_x else p_loss.log_prob(x),
            squared_error=squared_error(x, p_x.mean),
            sigma=None if sigma is None else sigma.flatten(1).mean(dim=1),
        )

    def compile(self, **kwargs: Any) -> None:
        """``torch.compile`` in place, so that the state dict keeps its keys: the encoder, the
        decoder, and ``observed_terms``, whose elementwise operations (dozens for the logistic
        mixture) it fuses into a few kernels."""
        self.encoder.compile(**kwargs)
        self.decoder.compile(**kwargs)
        self.observed_terms = torch.compile(self.observed_terms, **kwargs)

    def prior_draws(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """``num_samples`` latents z ~ N(0, I), on the decoder's device and in its dtype."""
        param = next(self.decoder.parameters())
        return torch.randn(
            num_samples,
            self.latent_dim,
            generator=generator,
            device=param.device,
            dtype=param.dtype,
        )

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Decoder means for z drawn from the prior N(0, I)."""
        return self.decode(self.prior_draws(num_samples, generator))
