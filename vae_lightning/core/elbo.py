"""The terms of the VAE's evidence lower bound, per image, in nats.

Images are scaled to [0, 1] with 256 bins of width 1/256 (``to_unit_interval``), so a continuous
log-density on that scale becomes a bound on the 8-bit image's log-probability by subtracting
``D * log(256)``; ``bits_per_dim`` does exactly that.
"""

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)
NUM_BINS = 256


def to_unit_interval(images: Tensor, dequantize: bool) -> Tensor:
    """uint8 pixels k -> float (k + u) / 256, u ~ U[0, 1) if ``dequantize`` else u = 1/2: the
    bin of width 1/256 that k stands for, or its centre."""
    x = images.float()
    offset = torch.rand_like(x) if dequantize else 0.5
    return (x + offset) / NUM_BINS


def squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """``||x - x_hat||^2`` per image, summed over every dimension but the batch one."""
    return (x - x_hat).pow(2).flatten(1).sum(dim=1)


def gaussian_log_likelihood(x: Tensor, x_hat: Tensor, log_sigma: Tensor | float) -> Tensor:
    """``log N(x | x_hat, sigma^2 I)`` per image, with the ``-(D/2) log(2 pi sigma^2)`` constant.

    ``log_sigma`` is a scalar (one sigma for every image) or a tensor of shape ``(B,)``.
    """
    return log_likelihood_from_squared_error(squared_error(x, x_hat), x[0].numel(), log_sigma)


def log_likelihood_from_squared_error(
    squared_error: Tensor, num_dims: int, log_sigma: Tensor | float
) -> Tensor:
    """``log N(x | x_hat, sigma^2 I)`` given ``||x - x_hat||^2`` (any shape) and the dimension D."""
    log_sigma = torch.as_tensor(log_sigma, dtype=squared_error.dtype, device=squared_error.device)
    return (
        -0.5 * squared_error * torch.exp(-2.0 * log_sigma)
        - num_dims * log_sigma
        - 0.5 * num_dims * LOG_2PI
    )


def diagonal_normal_log_density(z: Tensor, mu: Tensor | float, logvar: Tensor | float) -> Tensor:
    """``log N(z | mu, diag exp(logvar))`` summed over the last dimension."""
    mu = torch.as_tensor(mu, dtype=z.dtype, device=z.device)
    logvar = torch.as_tensor(logvar, dtype=z.dtype, device=z.device)
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(dim=-1)


def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """Analytic ``KL(N(mu, diag exp(logvar)) || N(0, I))`` per image."""
    return kl_per_dimension(mu, logvar).sum(dim=1)


def kl_per_dimension(mu: Tensor, logvar: Tensor) -> Tensor:
    """The analytic KL's terms, one per latent dimension: shape ``(B, H)``."""
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())


def bits_per_dim(log_likelihood: Tensor, num_dims: int, num_bins: int = NUM_BINS) -> Tensor:
    """Negative log-probability of the discrete image in bits per dimension.

    ``log_likelihood`` is a log-density (nats) of an image scaled to [0, 1] with ``num_bins``
    bins of width ``1/num_bins``; the probability of a bin is density times volume
    ``num_bins ** -num_dims``, hence the ``+ log(num_bins)`` per dimension.
    """
    return (-log_likelihood / num_dims + math.log(num_bins)) / math.log(2.0)
