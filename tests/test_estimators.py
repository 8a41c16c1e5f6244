"""The log p(x) estimators against a linear-Gaussian VAE, whose log p(x) is known exactly."""

import math

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal

from vae_lightning.core.estimators import grid_log_likelihood, sampled_estimates
from vae_lightning.core.likelihoods import GaussianLikelihood
from vae_lightning.core.vae import VAE


def linear_gaussian_vae(num_dims: int, latent_dim: int, sigma: float, seed: int = 0):
    """Decoder x_hat = W z + b, so x ~ N(b, W W^T + sigma^2 I) exactly.

    The encoder gives the exact posterior mean but only the diagonal of its covariance, widened
    by e^0.5: a proposal that is good but not perfect, so the ELBO has a gap that IWAE closes.
    """
    gen = torch.Generator().manual_seed(seed)
    w = 0.8 * torch.randn(num_dims, latent_dim, generator=gen, dtype=torch.float64)
    b = 0.1 * torch.randn(num_dims, generator=gen, dtype=torch.float64)
    posterior_cov = torch.linalg.inv(
        torch.eye(latent_dim, dtype=torch.float64) + w.T @ w / sigma**2
    )
    gain = posterior_cov @ w.T / sigma**2
    encoder = nn.Linear(num_dims, 2 * latent_dim).double()
    decoder = nn.Linear(latent_dim, num_dims).double()
    with torch.no_grad():
        encoder.weight.zero_()
        encoder.weight[:latent_dim] = gain
        encoder.bias[:latent_dim] = -gain @ b
        encoder.bias[latent_dim:] = torch.diagonal(posterior_cov).log() + 0.5
        decoder.weight.copy_(w)
        decoder.bias.copy_(b)
    likelihood = GaussianLikelihood(sigma, mean_transform=nn.Identity())
    vae = VAE(encoder, decoder, latent_dim=latent_dim, likelihood=likelihood).double()
    marginal = MultivariateNormal(b, w @ w.T + sigma**2 * torch.eye(num_dims, dtype=torch.float64))
    x = marginal.sample((16,))
    return vae, x, marginal.log_prob(x)


@pytest.fixture(scope="module")
def model_2d():
    torch.manual_seed(0)
    return linear_gaussian_vae(num_dims=50, latent_dim=2, sigma=0.3)


def mean_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return (estimate - exact).abs().mean().item()


def test_elbo_is_below_log_px_and_iwae_converges_to_it(model_2d):
    vae, x, exact = model_2d
    gen = torch.Generator().manual_seed(1)
    errors = {}
    for k in (1, 10, 100, 1000, 5000):
        estimates = sampled_estimates(vae, x, num_samples=k, max_batch=20_000, generator=gen)
        errors[k] = mean_error(estimates.iwae, exact)
        if k >= 1000:  # the ELBO bounds log p(x) in expectation: check where MC error is small
            assert torch.all(estimates.elbo < exact)
            assert torch.all(estimates.elbo < estimates.iwae)
    assert errors[1] > errors[10] > errors[100] > errors[1000] > errors[5000]
    assert errors[5000] < 0.01
    assert errors[1] > 0.05  # the proposal really is imperfect


def test_grid_integral_matches_log_px_for_two_latent_dims(model_2d):
    vae, x, exact = model_2d
    estimate = grid_log_likelihood(vae, x, points_per_axis=400, limit=6.0)
    torch.testing.assert_close(estimate.log_px, exact, atol=1e-4, rtol=0)
    assert estimate.edge_share.max() < 1e-6


def test_grid_integral_for_one_latent_dim():
    vae, x, exact = linear_gaussian_vae(num_dims=30, latent_dim=1, sigma=0.5, seed=3)
    estimate = grid_log_likelihood(vae, x, points_per_axis=2000, limit=7.0)
    torch.testing.assert_close(estimate.log_px, exact, atol=1e-4, rtol=0)
    assert estimate.edge_share.max() < 1e-6


def test_prior_sampling_is_visibly_worse_than_importance_sampling(model_2d):
    vae, x, exact = model_2d
    estimates = sampled_estimates(
        vae, x, num_samples=1000, generator=torch.Generator().manual_seed(2)
    )
    iwae_error = mean_error(estimates.iwae, exact)
    prior_error = mean_error(estimates.prior, exact)
    assert prior_error > 10 * iwae_error, (prior_error, iwae_error)


def test_a_grid_too_small_says_so_through_its_edge_share(model_2d):
    vae, x, exact = model_2d
    estimate = grid_log_likelihood(vae, x, points_per_axis=40, limit=1.0)
    lost = estimate.log_px < exact - 0.01  # mass beyond the grid is lost for these images ...
    assert 0 < lost.sum() < len(x) and torch.all(estimate.log_px < exact + 1e-6)
    assert torch.all(estimate.edge_share[lost] > 0.01)  # ... and their outermost cells show it
    assert torch.all(estimate.edge_share[~lost] < 0.01)


def test_grid_refuses_more_than_two_latent_dims():
    vae, _, _ = linear_gaussian_vae(num_dims=10, latent_dim=3, sigma=0.5)
    with pytest.raises(ValueError, match="latent_dim <= 2"):
        grid_log_likelihood(vae, torch.zeros(1, 10, dtype=torch.float64), 10, limit=3.0)


def test_batching_over_samples_does_not_change_the_estimates(model_2d):
    vae, x, _ = model_2d

    def run(max_batch):
        gen = torch.Generator().manual_seed(4)
        return sampled_estimates(vae, x, num_samples=37, max_batch=max_batch, generator=gen)

    small, large = run(max_batch=16), run(max_batch=10_000)
    for a, b in zip(small, large, strict=True):
        torch.testing.assert_close(a, b)


def test_iwae_with_the_exact_posterior_is_exact_for_any_k():
    # With q(z|x) = p(z|x) every importance weight equals p(x): zero variance.
    vae, x, exact = linear_gaussian_vae(num_dims=8, latent_dim=1, sigma=0.5, seed=5)
    posterior_var = 1.0 / (1.0 + (vae.decoder.weight**2).sum() / 0.25)
    with torch.no_grad():
        vae.encoder.bias[1] = math.log(posterior_var.item())
    estimates = sampled_estimates(vae, x, num_samples=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(estimates.iwae, exact)


def test_without_prior_sampling_the_same_draws_give_the_same_bounds_for_half_the_calls(model_2d):
    vae, x, _ = model_2d
    calls = []
    hook = vae.decoder.register_forward_hook(lambda module, args, out: calls.append(len(out)))
    estimates = {}
    for prior_sampling in (True, False):
        gen = torch.Generator().manual_seed(6)
        estimates[prior_sampling] = sampled_estimates(
            vae, x, 50, max_batch=10_000, generator=gen, prior_sampling=prior_sampling
        )
    hook.remove()
    assert calls == [50 * len(x)] * 3  # two calls with the prior's draws, one without
    assert estimates[False].prior is None and estimates[True].prior is not None
    torch.testing.assert_close(estimates[False].iwae, estimates[True].iwae, rtol=0, atol=0)
    torch.testing.assert_close(estimates[False].elbo, estimates[True].elbo, rtol=0, atol=0)
