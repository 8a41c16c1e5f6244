"""The ELBO's terms against independent computations: torch.distributions, Monte Carlo, by hand."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from tests.helpers import make_module
from vae_lightning.core.elbo import (
    bits_per_dim,
    diagonal_normal_log_density,
    gaussian_log_likelihood,
    kl_to_standard_normal,
    log_likelihood_from_squared_error,
    squared_error,
)


def test_gaussian_log_likelihood_by_hand():
    # D = 2, x - x_hat = (1, 1), sigma = 1: -||1||^2/2 - (2/2) log(2 pi) = -1 - log(2 pi)
    x = torch.zeros(1, 2)
    x_hat = torch.ones(1, 2)
    expected = -1.0 - math.log(2 * math.pi)
    assert gaussian_log_likelihood(x, x_hat, 0.0).item() == pytest.approx(expected, abs=1e-6)
    # sigma = 2: -2/(2*4) - 2 log 2 - log(2 pi)
    expected = -0.25 - 2 * math.log(2.0) - math.log(2 * math.pi)
    value = gaussian_log_likelihood(x, x_hat, math.log(2.0)).item()
    assert value == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("sigma", [0.05, 0.1, 1.0, 3.0])
def test_gaussian_log_likelihood_matches_torch_normal(sigma):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=gen, dtype=torch.float64)
    x_hat = torch.rand(4, 3, 32, 32, generator=gen, dtype=torch.float64)
    expected = Normal(x_hat, sigma).log_prob(x).flatten(1).sum(1)
    actual = gaussian_log_likelihood(x, x_hat, math.log(sigma))
    torch.testing.assert_close(actual, expected)


def test_gaussian_log_likelihood_per_image_sigma():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 8, 8, generator=gen, dtype=torch.float64)
    x_hat = torch.rand(3, 3, 8, 8, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    expected = Normal(x_hat, sigma.view(3, 1, 1, 1)).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_likelihood(x, x_hat, sigma.log()), expected)


def test_squared_error_sums_every_dimension_per_image():
    x = torch.zeros(2, 3, 2, 2)
    x_hat = torch.ones(2, 3, 2, 2)
    x_hat[1] *= 2
    torch.testing.assert_close(squared_error(x, x_hat), torch.tensor([12.0, 48.0]))


def test_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(2)
    mu = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    logvar = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    q = Normal(mu, torch.exp(0.5 * logvar))
    expected = kl_divergence(q, Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(kl_to_standard_normal(mu, logvar), expected)


def test_kl_by_hand_and_zero_at_the_prior():
    # KL(N(mu, s^2) || N(0, 1)) = (s^2 + mu^2 - 1)/2 - log s; mu = 1, s = 1: 1/2
    assert kl_to_standard_normal(torch.ones(1, 1), torch.zeros(1, 1)).item() == pytest.approx(0.5)
    assert kl_to_standard_normal(torch.zeros(2, 8), torch.zeros(2, 8)).abs().max().item() == 0.0


def test_kl_matches_monte_carlo_estimate():
    gen = torch.Generator().manual_seed(3)
    mu = torch.tensor([[0.5, -1.0, 2.0, 0.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, -1.0, 0.5, -2.0]], dtype=torch.float64)
    std = torch.exp(0.5 * logvar)
    n = 400_000
    z = mu + std * torch.randn(n, 4, generator=gen, dtype=torch.float64)
    log_ratio = (Normal(mu, std).log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(1)
    estimate = log_ratio.mean().item()
    stderr = log_ratio.std().item() / math.sqrt(n)
    analytic = kl_to_standard_normal(mu, logvar).item()
    assert abs(estimate - analytic) < 4 * stderr
    assert stderr < 0.01  # the check is sharp enough to catch a wrong term


def test_bits_per_dim_of_the_uniform_density_is_eight_bits():
    # A uniform density on [0, 1]^D (log p = 0) puts mass 1/256 on every 8-bit value.
    for num_dims in (1, 3072):
        assert bits_per_dim(torch.tensor(0.0), num_dims).item() == pytest.approx(8.0)
    # Density 256^D: one bin holds all the mass, 0 bits.
    zero = bits_per_dim(torch.tensor(3072 * math.log(256.0)), 3072).item()
    assert zero == pytest.approx(0.0, abs=1e-6)


def test_bits_per_dim_matches_exact_discretized_gaussian():
    # Pixel k in 0..255 is the bin [k/256, (k+1)/256). For a smooth density, the ELBO-style
    # estimate E_u[log p((k+u)/256)] + discretization term must match -log2 P(bin) exactly
    # computed from the Gaussian CDF.
    mean, sigma = 0.43, 0.08
    normal = Normal(
        torch.tensor(mean, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64)
    )
    k = torch.arange(60, 160, dtype=torch.float64)
    exact_bits = -torch.log2(normal.cdf((k + 1) / 256) - normal.cdf(k / 256))
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000  # quadrature over the bin
    log_density = normal.log_prob((k[:, None] + u[None, :]) / 256).mean(1)
    estimate = bits_per_dim(log_density, num_dims=1)
    # Jensen: the estimate is an upper bound on the exact code length, and tight for smooth p.
    assert torch.all(estimate >= exact_bits - 1e-9)
    torch.testing.assert_close(estimate, exact_bits, atol=1e-3, rtol=0)


def test_the_log_likelihood_keeps_the_precision_of_its_squared_error():
    """A float sigma takes the squared error's dtype: in float64 a log-likelihood of millions of
    nats is exact to 1e-6 (with log sigma rounded to float32 it is off by about 0.4 nats)."""
    sq = torch.tensor([1e5 + 1e-3], dtype=torch.float64)
    value = log_likelihood_from_squared_error(sq, 3072, math.log(0.1))
    expected = -0.5 * (1e5 + 1e-3) / 0.01 - 3072 * math.log(0.1) - 1536 * math.log(2 * math.pi)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, abs=1e-6)


def test_the_normal_log_density_takes_float_parameters_in_the_latents_precision():
    z = torch.randn(4, 3, dtype=torch.float64)
    expected = Normal(torch.tensor(0.1, dtype=torch.float64), math.exp(0.15)).log_prob(z).sum(1)
    value = diagonal_normal_log_density(z, 0.1, 0.3)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, expected, rtol=0, atol=1e-13)


def test_one_image_gets_the_same_terms_as_in_a_batch():
    torch.manual_seed(0)
    vae = make_module().vae
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(1)
    batch = vae.elbo_terms(x)
    torch.manual_seed(1)
    first = vae.elbo_terms(x[:1])
    torch.testing.assert_close(first.bpd, batch.bpd[:1])
    torch.testing.assert_close(first.elbo, batch.elbo[:1])
