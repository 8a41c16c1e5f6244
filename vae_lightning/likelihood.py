"""Estimates of log p(x) = log ∫ p(x|z) p(z) dz for a trained VAE, per image, in nats.

- ``importance_sampled``: z_k ~ q(z|x), log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x): the IWAE bound,
  which rises to log p(x) as K grows; the mean of log p(x|z_k) minus the analytic KL is the ELBO
  from the same draws.
- ``prior_sampled``: z_k ~ p(z), log (1/K) Σ_k p(x|z_k): unbiased in p(x), useless in practice,
  because almost no prior draw explains a given x.
- ``grid_log_likelihood``: a Riemann sum over a grid in latent space, affordable only for H <= 2.

Samples and images are batched together: one decoder call takes up to ``max_batch`` latents.
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor

from vae_lightning.elbo import (
    diagonal_normal_log_density,
    gaussian_log_likelihood,
    kl_to_standard_normal,
    log_likelihood_from_squared_error,
)
from vae_lightning.model import VAE


class SampledEstimates(NamedTuple):
    """Per image, nats: the K-sample ELBO, the IWAE bound, and the prior-sampling estimate."""

    elbo: Tensor
    iwae: Tensor
    prior: Tensor


def _decoder_log_likelihoods(vae: VAE, x: Tensor, z: Tensor, max_batch: int) -> Tensor:
    """``log p(x_b | z_kb)`` for latents ``z`` of shape ``(K, B, H)``: a ``(K, B)`` tensor."""
    num_samples, batch = z.shape[:2]
    per_call = max(1, max_batch // batch)
    log_sigma = vae.decoder_log_sigma()
    chunks = []
    for start in range(0, num_samples, per_call):
        z_chunk = z[start : start + per_call]
        k = z_chunk.shape[0]
        x_hat = vae.decode(z_chunk.reshape(k * batch, -1))
        x_rep = x.unsqueeze(0).expand(k, *x.shape).reshape(x_hat.shape)
        chunks.append(gaussian_log_likelihood(x_rep, x_hat, log_sigma).view(k, batch))
    return torch.cat(chunks)


@torch.no_grad()
def sampled_estimates(
    vae: VAE, x: Tensor, num_samples: int, max_batch: int = 4096, generator=None
) -> SampledEstimates:
    """ELBO, IWAE and prior-sampling estimates of log p(x) with ``num_samples`` draws each."""
    mu, logvar = vae.encode(x)
    std = torch.exp(0.5 * logvar)
    shape = (num_samples, *mu.shape)
    eps = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu + std * eps
    log_px_z = _decoder_log_likelihoods(vae, x, z, max_batch)
    log_w = log_px_z + diagonal_normal_log_density(z, 0.0, 0.0)
    log_w = log_w - diagonal_normal_log_density(z, mu, logvar)
    log_k = math.log(num_samples)

    z_prior = torch.randn(shape, generator=generator, device=mu.device, dtype=mu.dtype)
    log_px_prior = _decoder_log_likelihoods(vae, x, z_prior, max_batch)
    return SampledEstimates(
        elbo=log_px_z.mean(0) - kl_to_standard_normal(mu, logvar),
        iwae=torch.logsumexp(log_w, 0) - log_k,
        prior=torch.logsumexp(log_px_prior, 0) - log_k,
    )


class LatentGrid(NamedTuple):
    """Cell centres of a regular grid over [-limit, limit]^H, decoded once."""

    x_hat: Tensor  # (G, D), flattened decoder means
    log_prior: Tensor  # (G,)
    on_edge: Tensor  # (G,) True for the outermost ring of cells
    log_cell_volume: float


class GridEstimate(NamedTuple):
    """Per image: the Riemann sum of log p(x), and the share of it in the outermost cells
    (when that share is not negligible, the grid cuts off mass: widen it)."""

    log_px: Tensor
    edge_share: Tensor


@torch.no_grad()
def decode_grid(vae: VAE, points_per_axis: int, limit: float, max_batch: int = 4096) -> LatentGrid:
    """Decode the m^H cell centres of the grid; H must be 1 or 2 (m^H decoder calls)."""
    if vae.latent_dim > 2:
        raise ValueError(f"a latent grid needs latent_dim <= 2, got {vae.latent_dim}")
    device, dtype = vae.log_sigma.device, vae.log_sigma.dtype
    step = 2 * limit / points_per_axis
    axis = -limit + step * (torch.arange(points_per_axis, device=device, dtype=dtype) + 0.5)
    points = torch.cartesian_prod(*[axis] * vae.latent_dim).reshape(-1, vae.latent_dim)
    x_hat = torch.cat([vae.decode(c).flatten(1) for c in points.split(max_batch)])
    log_prior = diagonal_normal_log_density(points, 0.0, 0.0)
    on_edge = (points.abs() > limit - step).any(dim=1)
    return LatentGrid(x_hat, log_prior, on_edge, vae.latent_dim * math.log(step))


@torch.no_grad()
def grid_log_likelihood(vae: VAE, x: Tensor, grid: LatentGrid) -> GridEstimate:
    """log Σ_g p(x|z_g) p(z_g) ΔV per image (Riemann sum), for a grid from ``decode_grid``."""
    x_flat = x.flatten(1).double()
    x_hat = grid.x_hat.double()
    # ||x - x_hat||^2 for every (image, grid point) pair, as a matrix product.
    sq = x_flat.pow(2).sum(1, keepdim=True) + x_hat.pow(2).sum(1) - 2.0 * x_flat @ x_hat.T
    log_px_z = log_likelihood_from_squared_error(
        sq.clamp_min(0.0), x_flat.shape[1], vae.decoder_log_sigma().double()
    )
    log_joint = log_px_z + grid.log_prior.double()
    log_total = torch.logsumexp(log_joint, dim=1)
    edge_share = torch.exp(torch.logsumexp(log_joint[:, grid.on_edge], dim=1) - log_total)
    return GridEstimate((log_total + grid.log_cell_volume).to(x.dtype), edge_share.to(x.dtype))
