"""How much of the latent space the posterior q(z|x) uses: posterior-collapse diagnostics.

- active units (Burda et al. 2016): latent dimensions j with Cov_x(E_q[z_j]) above a threshold;
- KL per latent dimension, averaged over images (a collapsed dimension has KL ~ 0);
- mutual information I(x; z) under q (Hoffman & Johnson 2016): E_x E_q[log q(z|x) - log q(z)],
  estimated on a batch with one sample per image and the aggregate posterior q(z) taken as the
  batch's mixture of posteriors. It is at most log(batch size).
"""

import math

import torch
from torch import Tensor

from vae_lightning.core.elbo import diagonal_normal_log_density


def active_units(mu_variance: Tensor, threshold: float = 0.01) -> int:
    """The number of latent dimensions whose posterior mean varies more than ``threshold``."""
    return int((mu_variance > threshold).sum())


def mutual_information(mu: Tensor, logvar: Tensor, z: Tensor) -> Tensor:
    """I(x; z) in nats for a batch: posteriors ``(mu, logvar)`` of shape ``(B, H)`` and one
    sample ``z`` of shape ``(B, H)`` from each; the mean over i of
    ``log q(z_i|x_i) - log (1/B) sum_b q(z_i|x_b)``. It is at most log B (each z_i told apart
    from the others' posteriors), and 0 when all posteriors agree (posterior collapse)."""
    # log q(z_i | x_b) for every sample i against every posterior b: a (B, B) matrix
    log_q = diagonal_normal_log_density(z[:, None, :], mu[None], logvar[None])
    log_aggregate = torch.logsumexp(log_q, dim=1) - math.log(len(mu))
    return (log_q.diagonal() - log_aggregate).mean()
