"""The samplers of generated images' latents, against independent computations: scikit-learn's
mixture density, moments of known Gaussians, and the ELBO written out with torch.distributions."""

import logging
import math

import pytest
import torch
from sklearn.mixture import GaussianMixture
from torch.distributions import Normal, kl_divergence

from tests.helpers import composed
from vae_lightning.config import build
from vae_lightning.errors import ConfigError
from vae_lightning.evaluation.samplers import (
    GaussianMixtureSampler,
    PriorSampler,
    TwoStageSampler,
    load_or_fit,
)


def two_clusters(seed: int = 0) -> torch.Tensor:
    """300 + 700 points in R^3: an anisotropic, correlated cluster and a round one."""
    rng = torch.Generator().manual_seed(seed)
    a = torch.randn(300, 3, generator=rng) @ torch.tensor(
        [[1.0, 0.0, 0.0], [0.5, 0.3, 0.0], [0.0, 0.2, 2.0]]
    )
    b = 0.5 * torch.randn(700, 3, generator=rng) - 2.0
    return torch.cat([a + torch.tensor([4.0, 0.0, 0.0]), b])


def test_the_mixture_density_is_scikit_learns_and_its_draws_have_its_moments():
    mu = two_clusters()
    sampler = GaussianMixtureSampler(3, components=2, seed=0)
    sampler.fit(mu, torch.full_like(mu, -4.0), torch.Generator().manual_seed(0))
    reference = GaussianMixture(2, covariance_type="full", max_iter=200, random_state=0)
    reference.fit(mu.double().numpy())
    points = torch.cat([mu[:50], torch.randn(50, 3) * 3])  # in the clusters and between them
    expected = torch.from_numpy(reference.score_samples(points.double().numpy()))
    torch.testing.assert_close(sampler.log_prob(points), expected, rtol=1e-5, atol=1e-5)

    z = sampler.sample(200_000, torch.Generator().manual_seed(1)).double()
    weights = torch.from_numpy(reference.weights_)
    means = torch.from_numpy(reference.means_)
    mean = weights @ means
    second = torch.einsum("k,kij->ij", weights, torch.from_numpy(reference.covariances_))
    second += torch.einsum("k,ki,kj->ij", weights, means, means)
    torch.testing.assert_close(z.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), second - torch.outer(mean, mean), atol=0.05, rtol=0)


def test_prior_draws_are_standard_normal_scaled_by_the_temperature():
    z = PriorSampler(4, temperature=0.5).sample(100_000, torch.Generator().manual_seed(0))
    assert z.shape == (100_000, 4)
    torch.testing.assert_close(z.std(0), torch.full((4,), 0.5), atol=0.01, rtol=0)
    torch.testing.assert_close(z.mean(0), torch.zeros(4), atol=0.01, rtol=0)


def test_the_second_stage_learns_a_correlated_gaussian_of_latents():
    torch.manual_seed(0)
    cholesky = torch.tensor([[1.5, 0.0], [0.8, 0.4]])
    mu = torch.randn(1000, 2) @ cholesky.T + torch.tensor([2.0, -1.0])
    sampler = TwoStageSampler(2, hidden_dims=[32], epochs=100, batch_size=100, lr=3e-3)
    sampler.fit(mu, torch.full_like(mu, -8.0), torch.Generator().manual_seed(0))
    z = sampler.sample(20_000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(z.mean(0), torch.tensor([2.0, -1.0]), atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), cholesky @ cholesky.T, atol=0.2, rtol=0)


def test_the_second_stage_draws_its_density_and_with_no_decoder_noise_its_means():
    """A second stage whose decoder ignores u and outputs c, with sigma 0.7: its density is
    N(c, 0.49 I), and its decoder means are c."""
    c = torch.tensor([1.0, -2.0, 0.5])
    draws = {}
    for noise in (True, False):
        sampler = TwoStageSampler(3, hidden_dims=[4], decoder_noise=noise)
        with torch.no_grad():
            for parameter in sampler.vae.decoder.parameters():
                parameter.zero_()
            sampler.vae.decoder[-1].bias.copy_(c)
            sampler.vae.likelihood.log_sigma.fill_(math.log(0.7))
        draws[noise] = sampler.sample(50_000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws[True].mean(0), c, atol=0.02, rtol=0)
    torch.testing.assert_close(draws[True].std(0), torch.full((3,), 0.7), atol=0.01, rtol=0)
    assert torch.equal(draws[False], c.expand(50_000, 3))


def test_the_second_stage_loss_is_the_negative_elbo_written_out():
    sampler = TwoStageSampler(3, second_latent_dim=2, hidden_dims=[8])
    vae = sampler.vae
    with torch.no_grad():
        vae.likelihood.log_sigma.fill_(math.log(0.3))
    z = torch.randn(5, 3)
    torch.manual_seed(7)
    terms = vae.elbo_terms(z)
    torch.manual_seed(7)
    mu, logvar = vae.encoder(z).chunk(2, dim=1)
    u = mu + torch.exp(0.5 * logvar) * torch.randn(1, *mu.shape)[0]
    log_px = Normal(vae.decoder(u), 0.3).log_prob(z).sum(1)
    kl = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(terms.loss, kl - log_px)
    torch.testing.assert_close(terms.elbo, log_px - kl)


def test_a_fitted_sampler_is_saved_and_read_back_instead_of_refitted(tmp_path, caplog):
    mu = two_clusters()
    path = tmp_path / "gmm.pt"
    fits = []

    def posteriors():
        fits.append(1)
        return mu, torch.zeros_like(mu)

    key = {"checkpoint": "abc", "settings": {"components": 2}}
    first = load_or_fit(GaussianMixtureSampler(3, 2), path, key, posteriors, torch.Generator())
    again = load_or_fit(GaussianMixtureSampler(3, 2), path, key, posteriors, torch.Generator())
    assert len(fits) == 1
    torch.testing.assert_close(again.log_prob(mu), first.log_prob(mu))
    other = {"checkpoint": "def", "settings": {"components": 2}}
    load_or_fit(GaussianMixtureSampler(3, 2), path, other, posteriors, torch.Generator())
    assert len(fits) == 2  # another checkpoint: fitted anew
    path.write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING):
        load_or_fit(GaussianMixtureSampler(3, 2), path, other, posteriors, torch.Generator())
    assert len(fits) == 3 and "does not load" in caplog.text
    assert load_or_fit(PriorSampler(3), tmp_path / "prior.pt", key, posteriors, None)
    assert len(fits) == 3 and not (tmp_path / "prior.pt").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.samplers.gmm.components=0", "eval.samplers.gmm.components=0 is not allowed"),
        ("eval.samplers.prior.temperature=0", "eval.samplers.prior.temperature=0 is not allowed"),
        ("eval.samplers.prior.temperature=hot", "eval.samplers.prior.temperature='hot' is not"),
        ("eval.samplers.two_stage.epochs=0", "eval.samplers.two_stage.epochs=0 is not allowed"),
        (
            "eval.samplers.two_stage.decoder_noise=yes",
            "eval.samplers.two_stage.decoder_noise='yes' is not allowed",
        ),
    ],
)
def test_a_bad_sampler_setting_is_named_by_its_key(override, message):
    cfg = composed("ckpt_path=x.ckpt", override, config="eval")
    name = override.split(".")[2]
    with pytest.raises(ConfigError, match=message):
        build(cfg, f"eval.samplers.{name}", latent_dim=4)


def test_the_sampler_group_chooses_which_samplers_run():
    overrides = ["sampler=[prior,gmm]", "eval.samplers.prior.temperature=0.8"]
    cfg = composed("ckpt_path=x.ckpt", *overrides, config="eval")
    assert list(cfg.eval.samplers) == ["prior", "gmm"]
    assert build(cfg, "eval.samplers.prior", latent_dim=4).temperature == 0.8
    assert build(cfg, "eval.samplers.gmm", latent_dim=4).components == 10
