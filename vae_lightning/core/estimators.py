"""Estimates of log p(x) = log ∫ p(x|z) p(z) dz for a trained VAE, per image, in nats.

- ``importance_sampled``: z_k ~ q(z|x), log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x): the IWAE bound,
  which rises to log p(x) as K grows; the mean of log p(x|z_k) minus the analytic KL is the ELBO
  from the same draws.
- ``prior_sampled``: z_k ~ p(z), log (1/K) Σ_k p(x|z_k): unbiased in p(x), useless in practice,
  because almost no prior draw explains a given x.
- ``grid_log_likelihood``: a Riemann sum over a grid in latent space, affordable only for H <= 2.

Samples and images are batched together: one decoder call takes up to ``max_batch`` latents when
the likelihood head has one output per image value, and proportionally fewer when it has more
(``latents_per_call``), so that one ``max_batch`` bounds the memory of every head.
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor

from vae_lightning.core.elbo import (
    diagonal_normal_log_density,
    kl_to_standard_normal,
    log_likelihood_from_squared_error,
)
from vae_lightning.core.likelihoods import IMAGE_CHANNELS
from vae_lightning.core.vae import VAE


class SampledEstimates(NamedTuple):
    """Per image, nats: the K-sample ELBO, the IWAE bound, and the prior-sampling estimate
    (None when not asked for)."""

    elbo: Tensor
    iwae: Tensor
    prior: Tensor | None


def latents_per_call(vae: VAE, max_batch: int) -> int:
    """Latents per decoder call: ``max_batch`` divided by the head's outputs per image value
    (1 for a Gaussian mean, 2 with a heteroscedastic sigma, 100/3 for ten logistic mixtures).
    The decoder's output and the likelihood's terms, which take most of the memory, grow with
    those outputs."""
    return max(1, max_batch * IMAGE_CHANNELS // vae.likelihood.out_channels)


def _decoder_log_likelihoods(vae: VAE, x: Tensor, z: Tensor, max_batch: int) -> Tensor:
    """``log p(x_b | z_kb)`` for latents ``z`` of shape ``(K, B, H)``: a ``(K, B)`` tensor."""
    num_samples, batch = z.shape[:2]
    per_call = max(1, latents_per_call(vae, max_batch) // batch)
    chunks = []
    for start in range(0, num_samples, per_call):
        z_chunk = z[start : start + per_call]
        k = z_chunk.shape[0]
        x_rep = x.unsqueeze(0).expand(k, *x.shape).flatten(0, 1)
        chunks.append(vae.log_likelihood(x_rep, z_chunk.flatten(0, 1)).view(k, batch))
    return torch.cat(chunks)


@torch.no_grad()
def sampled_estimates(
    vae: VAE,
    x: Tensor,
    num_samples: int,
    max_batch: int = 4096,
    generator: torch.Generator | None = None,
    prior_sampling: bool = True,
) -> SampledEstimates:
    """ELBO, IWAE and (``prior_sampling``) prior-sampling estimates of log p(x) with
    ``num_samples`` draws each; the prior's draws double the decoder calls."""
    mu, logvar = vae.encode(x)
    std = torch.exp(0.5 * logvar)
    shape = (num_samples, *mu.shape)
    eps = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + std * eps
    log_px_z = _decoder_log_likelihoods(vae, x, z, max_batch)
    log_w = log_px_z + diagonal_normal_log_density(z, 0.0, 0.0)
    log_w = log_w - diagonal_normal_log_density(z, mu, logvar)
    log_k = math.log(num_samples)
    prior = None
    if prior_sampling:
        z_prior = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)
        prior = torch.logsumexp(_decoder_log_likelihoods(vae, x, z_prior, max_batch), 0) - log_k
    return SampledEstimates(
        elbo=log_px_z.mean(0) - kl_to_standard_normal(mu, logvar),
        iwae=torch.logsumexp(log_w, 0) - log_k,
        prior=prior,
    )


class GridEstimate(NamedTuple):
    """Per image: the Riemann sum of log p(x), and the share of it in the outermost ring of
    cells (when that share is not negligible, the grid cuts off mass: widen it)."""

    log_px: Tensor
    edge_share: Tensor


@torch.no_grad()
def grid_log_likelihood(
    vae: VAE, x: Tensor, points_per_axis: int, limit: float, max_batch: int = 4096
) -> GridEstimate:
    """log Σ_g p(x|z_g) p(z_g) ΔV per image over the m^H cell centres of [-limit, limit]^H.

    Affordable for H <= 2 only. Each chunk of grid points is decoded once and scored against
    every image at once, so the cost is m^H decoder calls however many images there are.
    """
    if vae.latent_dim > 2:
        raise ValueError(f"a latent grid needs latent_dim <= 2, got {vae.latent_dim}")
    step = 2 * limit / points_per_axis
    axis = -limit + step * (torch.arange(points_per_axis, device=x.device, dtype=x.dtype) + 0.5)
    points = torch.cartesian_prod(*[axis] * vae.latent_dim).reshape(-1, vae.latent_dim)
    totals, edges = [], []
    for chunk in points.split(max(1, latents_per_call(vae, max_batch) // max(1, len(x)))):
        log_joint = _grid_log_likelihoods(vae, x, chunk).double()
        log_joint = log_joint + diagonal_normal_log_density(chunk.double(), 0.0, 0.0)
        totals.append(torch.logsumexp(log_joint, dim=1))
        on_edge = (chunk.abs() > limit - step).any(dim=1)
        edges.append(torch.logsumexp(log_joint[:, on_edge], dim=1))
    log_total = torch.logsumexp(torch.stack(totals), dim=0)
    edge_share = torch.exp(torch.logsumexp(torch.stack(edges), dim=0) - log_total)
    log_cell_volume = vae.latent_dim * math.log(step)
    return GridEstimate((log_total + log_cell_volume).to(x.dtype), edge_share.to(x.dtype))


def _grid_log_likelihoods(vae: VAE, x: Tensor, z: Tensor) -> Tensor:
    """``log p(x_b | z_g)`` for every image and grid point: a ``(B, G)`` tensor. With one
    Gaussian sigma, ||x - x_hat||^2 comes from a float64 matrix product (one decoder call per
    point); any other likelihood scores every (image, point) pair."""
    log_sigma = vae.likelihood.scalar_log_sigma()
    if log_sigma is not None and not vae.likelihood.discrete:
        x_flat = x.flatten(1).double()
        x_hat = vae.decode(z).flatten(1).double()
        sq = x_flat.pow(2).sum(1, keepdim=True) + x_hat.pow(2).sum(1) - 2.0 * x_flat @ x_hat.T
        return log_likelihood_from_squared_error(
            sq.clamp_min(0.0), x_flat.shape[1], log_sigma.double()
        )
    out = vae.decoder(z)
    pairs_x = x.unsqueeze(1).expand(len(x), len(z), *x.shape[1:]).flatten(0, 1)
    pairs_out = out.unsqueeze(0).expand(len(x), *out.shape).flatten(0, 1)
    return vae.likelihood(pairs_out).log_prob(pairs_x).view(len(x), len(z))
