"""The decoder likelihoods and sigma modes against independent computations."""

import math

import pytest
import torch
from torch.distributions import Normal

from tests.helpers import ADAM, MLP, fit_in_process, head_config, make_module
from vae_lightning.core.estimators import grid_log_likelihood, sampled_estimates
from vae_lightning.core.likelihoods import (
    DiscretizedGaussian,
    DiscretizedLogisticMixture,
    Gaussian,
    GaussianLikelihood,
    LogisticMixtureLikelihood,
    bin_index,
)
from vae_lightning.training.lit_module import VAELitModule

D = 3 * 32 * 32
ALL_VALUES = ((torch.arange(256, dtype=torch.float64) + 0.5) / 256).view(256, 1)


def batch(n: int = 4, dequantized: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    k = torch.randint(0, 256, (n, 3, 32, 32), generator=gen).double()
    u = torch.rand(k.shape, generator=gen, dtype=torch.float64) if dequantized else 0.5
    return (k + u) / 256


@pytest.mark.parametrize(
    ("loc", "sigma"),
    [(0.5, 0.1), (0.02, 0.003), (0.97, 1e-3), (1.4, 0.05), (-0.3, 0.2), (0.4, 20.0)],
)
def test_discretized_gaussian_probabilities_are_normal_cdf_differences_and_sum_to_one(loc, sigma):
    p = DiscretizedGaussian(
        torch.full_like(ALL_VALUES, loc), torch.tensor(math.log(sigma), dtype=torch.float64)
    )
    log_probs = p.log_prob(ALL_VALUES)
    normal = Normal(torch.tensor(loc, dtype=torch.float64), sigma)
    edges = torch.arange(1, 256, dtype=torch.float64) / 256
    cdf = torch.cat([torch.zeros(1), normal.cdf(edges), torch.ones(1)]).double()
    expected = cdf[1:] - cdf[:-1]
    torch.testing.assert_close(log_probs.exp(), expected, atol=1e-12, rtol=1e-6)
    assert log_probs.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_gaussian_is_stable_in_float32_far_in_the_tails():
    """Bins hundreds of sigmas from the mean: finite log-probabilities close to the float64
    ones, and finite gradients."""
    loc = torch.tensor([0.001, 0.999, 0.5, 0.5], requires_grad=True)
    log_sigma = torch.tensor([math.log(1e-3), math.log(1e-3), math.log(0.5), math.log(3.0)])
    x = torch.tensor([0.99, 0.01, 0.9, 0.1]).view(4, 1)
    p32 = DiscretizedGaussian(loc.view(4, 1), log_sigma.view(4, 1))
    lp32 = p32.log_prob(x)
    lp32.sum().backward()
    assert torch.isfinite(lp32).all() and torch.isfinite(loc.grad).all()
    p64 = DiscretizedGaussian(loc.detach().double().view(4, 1), log_sigma.double().view(4, 1))
    torch.testing.assert_close(lp32.double(), p64.log_prob(x.double()), rtol=1e-4, atol=0)
    assert lp32[0].item() < -1e5  # a bin ~1000 sigmas away: about -(1000^2)/2


def slow_logistic_mixture_log_prob(raw: torch.Tensor, x: torch.Tensor, m: int) -> float:
    """PixelCNN++'s likelihood, one image, pixel by pixel with plain floats."""

    def cdf(t: float) -> float:
        return 1.0 / (1.0 + math.exp(-t)) if t > -700 else 0.0

    total = 0.0
    _, height, width = x.shape
    for i in range(height):
        for j in range(width):
            logits = [raw[c, i, j].item() for c in range(m)]
            weights = [math.exp(v - max(logits)) for v in logits]
            weights = [w / sum(weights) for w in weights]
            k = [math.floor(x[c, i, j].item() * 256) for c in range(3)]
            value = [2 * (kc + 0.5) / 256 - 1 for kc in k]
            prob = 0.0
            for comp in range(m):

                def param(kind: int, channel: int, comp=comp, i=i, j=j) -> float:
                    return raw[m + (kind * 3 + channel) * m + comp, i, j].item()

                means = [param(0, c) for c in range(3)]
                scales = [math.exp(max(param(1, c), -7.0)) for c in range(3)]
                coeff = [math.tanh(param(2, c)) for c in range(3)]
                means[1] += coeff[0] * value[0]
                means[2] += coeff[1] * value[0] + coeff[2] * value[1]
                p = weights[comp]
                for c in range(3):
                    upper = 1.0 if k[c] == 255 else cdf((value[c] + 1 / 256 - means[c]) / scales[c])
                    lower = 0.0 if k[c] == 0 else cdf((value[c] - 1 / 256 - means[c]) / scales[c])
                    p *= upper - lower
                prob += p
            total += math.log(prob)
    return total


@pytest.mark.parametrize(
    "log_scale",
    [-2.5, 1.6],  # components a few bins wide; and 5 wide, where a bin's mass is its density
)
def test_logistic_mixture_equals_a_slow_direct_computation(log_scale):
    m = 3
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 10 * m, 3, 4, generator=gen, dtype=torch.float64)
    raw[:, m : 4 * m] *= 0.5  # means on [-1, 1]
    raw[:, 4 * m : 7 * m] = raw[:, 4 * m : 7 * m] + log_scale
    x = torch.randint(0, 256, (2, 3, 3, 4), generator=gen).double() / 256 + 0.5 / 256
    x[0, :, 0, 0] = torch.tensor([0.5 / 256, 255.5 / 256, 0.5 / 256])  # the open outer bins
    fast = LogisticMixtureLikelihood(m)(raw).log_prob(x)
    for b in range(2):
        assert fast[b].item() == pytest.approx(slow_logistic_mixture_log_prob(raw[b], x[b], m))


def test_logistic_mixture_colours_with_one_red_value_sum_to_the_red_marginal():
    """Summed over all 256^2 green and blue values, the probabilities of the colours with red
    value k are P(R = k), the mixture of red's own logistic bins (edge bins open), whatever
    green's and blue's dependence on red: the conditionals of green and blue sum to one."""
    m = 2
    gen = torch.Generator().manual_seed(1)
    raw = torch.randn(1, 10 * m, 1, 1, generator=gen, dtype=torch.float64)
    raw[:, 4 * m : 7 * m] = -3.0  # narrow components: the sum must get the bins right
    raw[:, 7 * m :] *= 3.0  # strong channel coefficients
    weights = raw[0, :m, 0, 0].softmax(0)
    means, scales = raw[0, m : 2 * m, 0, 0], raw[0, 4 * m : 5 * m, 0, 0].exp()  # red's
    edges = torch.cat(
        [torch.tensor([-math.inf]), torch.arange(1, 256) / 128 - 1, torch.tensor([math.inf])]
    )
    cdf = torch.sigmoid((edges.view(-1, 1) - means) / scales)
    red_marginal = ((cdf[1:] - cdf[:-1]) * weights).sum(1)

    raw, values = raw.float(), ALL_VALUES[:, 0].float()  # 256^2 colours a slice: float32
    g, b = torch.meshgrid(values, values, indexing="ij")
    for k in (0, 1, 100, 127, 128, 254, 255):
        x = torch.stack([torch.full_like(g, values[k]), g, b]).flatten(1).T.reshape(-1, 3, 1, 1)
        p = DiscretizedLogisticMixture(raw.expand(len(x), -1, -1, -1), m)
        total = p.log_prob(x).double().exp().sum().item()
        assert total == pytest.approx(red_marginal[k].item(), abs=1e-6, rel=1e-5), k


def test_logistic_mixture_samples_lie_on_bin_centres_and_average_to_the_mean():
    m = 3
    gen = torch.Generator().manual_seed(2)
    raw = torch.randn(1, 10 * m, 2, 2, generator=gen, dtype=torch.float64) * 0.3
    raw[:, 4 * m : 7 * m] = -3.0
    p = DiscretizedLogisticMixture(raw.expand(20_000, -1, -1, -1), m)
    samples = p.sample(torch.Generator().manual_seed(3))
    assert samples.shape == (20_000, 3, 2, 2)
    torch.testing.assert_close(samples * 256 - 0.5, (samples * 256 - 0.5).round())
    torch.testing.assert_close(samples.mean(0), p.mean[0], atol=0.01, rtol=0)


def test_logistic_mixture_samples_have_the_probabilities_of_its_log_prob():
    """Two components with unequal weights, scales of about one bin and channel coefficients
    that shift G and B by R (and G): each frequent colour is drawn as often as its mass."""
    weights, coeffs = (
        torch.tensor([0.25, 0.75]),
        torch.tensor([[0.5, -0.2], [-0.4, 0.6], [0.3, 0.1]]),
    )
    means = torch.tensor([[-0.5, 0.4], [0.2, -0.3], [0.6, 0.0]])
    raw = (
        torch.cat(
            [
                weights.log(),
                means.flatten(),
                torch.full((6,), math.log(0.006)),
                coeffs.atanh().flatten(),
            ]
        )
        .view(1, 20, 1, 1)
        .double()
    )
    n = 200_000
    samples = DiscretizedLogisticMixture(raw.expand(n, -1, -1, -1), 2).sample(
        torch.Generator().manual_seed(0)
    )
    colours, counts = samples.flatten(1).unique(dim=0, return_counts=True)
    mass = (
        DiscretizedLogisticMixture(raw.expand(len(colours), -1, -1, -1), 2)
        .log_prob(colours.view(-1, 3, 1, 1))
        .exp()
    )
    assert mass.sum() > 0.99  # the drawn colours hold nearly all the mass
    frequent = mass > 0.005
    assert frequent.sum() >= 20
    expected, seen = mass[frequent], counts[frequent].double() / n
    assert ((seen - expected).abs() < 5 * (expected * (1 - expected) / n).sqrt()).all()


def test_per_pixel_sigma_with_equal_values_equals_one_learned_sigma():
    learned, per_pixel = (
        make_module(sigma=0.3, sigma_mode=mode) for mode in ("learned", "per_pixel")
    )
    assert learned.vae.likelihood.log_sigma.shape == ()
    assert per_pixel.vae.likelihood.log_sigma.shape == (3, 32, 32)
    x = batch()
    terms = {}
    for name, module in (("learned", learned), ("per_pixel", per_pixel)):
        torch.manual_seed(11)
        terms[name] = module.compute_terms(x)
        terms[name]["loss"].mean().backward()
    for key in ("loss", "elbo", "bpd"):
        torch.testing.assert_close(terms["per_pixel"][key], terms["learned"][key])
    grad = per_pixel.vae.likelihood.log_sigma.grad
    torch.testing.assert_close(grad.sum(), learned.vae.likelihood.log_sigma.grad)


def test_heteroscedastic_sigma_is_the_decoders_second_half_and_starts_at_sigma():
    module = make_module(sigma=0.1, sigma_mode="heteroscedastic")
    assert module.vae.decoder[-1].unflattened_size == (6, 32, 32)  # doubled output channels
    x = batch()
    torch.manual_seed(11)
    terms = module.compute_terms(x)
    torch.manual_seed(11)
    mu, logvar = module.vae.encode(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(1, *mu.shape, dtype=mu.dtype)[0]
    raw = module.vae.decoder(z)
    loc, sigma = raw[:, :3].sigmoid(), 0.1 * raw[:, 3:].exp()
    expected = Normal(loc, sigma).log_prob(x).flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
    torch.testing.assert_close(terms["elbo"], expected - kl)
    torch.testing.assert_close(terms["sigma"], sigma.flatten(1).mean(1))
    assert 0.05 < terms["sigma"].mean().item() < 0.2  # starts near the configured sigma


@pytest.mark.parametrize("mode", ["fixed", "learned", "per_pixel", "heteroscedastic"])
def test_sigma_has_its_floor_in_every_mode(mode):
    head = GaussianLikelihood(sigma=1e-6, sigma_mode=mode)
    out = torch.full((2, head.out_channels, 32, 32), -30.0)
    assert head(out).scale.min().item() == pytest.approx(1e-3)


def test_discrete_likelihoods_report_code_lengths():
    """bpd = -ELBO / (D ln 2) with a probability, no log 256 added; with the same decoder, the
    discretized Gaussian's probability is at most the density times the bin volume."""
    x = batch()
    terms = {}
    for kind in ("gaussian", "discretized_gaussian", "logistic_mixture"):
        module = make_module(sigma=0.2, kind=kind)
        torch.manual_seed(11)
        terms[kind] = module.compute_terms(x)
    for kind in ("discretized_gaussian", "logistic_mixture"):
        torch.testing.assert_close(terms[kind]["bpd"], -terms[kind]["elbo"] / (D * math.log(2)))
    gaussian_bpd = -terms["gaussian"]["elbo"] / (D * math.log(2)) + 8
    torch.testing.assert_close(terms["gaussian"]["bpd"], gaussian_bpd)
    assert torch.all(terms["discretized_gaussian"]["bpd"] < gaussian_bpd)  # sigma >> bin width


@pytest.mark.parametrize("k", [2, 5])
def test_iwae_objective_is_the_k_sample_bound(k):
    module = make_module(sigma=0.2, objective="iwae", iwae_samples=k)
    x = batch(3)
    torch.manual_seed(11)
    terms = module.compute_terms(x, module.iwae_samples)
    torch.manual_seed(11)
    mu, logvar = module.vae.encode(x)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(k, *mu.shape, dtype=mu.dtype)
    x_hat = module.vae.decoder(z.flatten(0, 1)).sigmoid().view(k, *x.shape)
    log_px_z = Normal(x_hat, 0.2).log_prob(x).flatten(2).sum(2)
    log_w = log_px_z + Normal(0.0, 1.0).log_prob(z).sum(2) - Normal(mu, std).log_prob(z).sum(2)
    iwae = torch.logsumexp(log_w, 0) - math.log(k)
    torch.testing.assert_close(terms["loss"], -iwae)
    kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
    torch.testing.assert_close(terms["elbo"], log_px_z.mean(0) - kl)
    # validation and test keep the one-sample ELBO
    assert module.compute_terms(x)["loss"].shape == (3,)


def test_the_latent_grid_scores_any_likelihood():
    """The grid's general path (every image-point pair through log_prob) agrees with its fast
    path for one Gaussian sigma, and gives log-probabilities (<= 0) for the discrete ones."""

    def grid(sigma_mode: str = "fixed", kind: str = "gaussian") -> torch.Tensor:
        torch.manual_seed(0)
        head = head_config(kind, sigma=0.3, sigma_mode=sigma_mode)
        module = VAELitModule(arch=MLP, optimizer=ADAM, latent_dim=2, likelihood=head).double()
        return grid_log_likelihood(module.vae, batch(3), 12, 4.0, max_batch=20).log_px

    torch.testing.assert_close(grid("per_pixel"), grid("fixed"))
    for kind in ("discretized_gaussian", "logistic_mixture"):
        assert torch.all(grid(kind=kind) < 0)


@pytest.mark.parametrize(
    ("kind", "images", "max_batch", "largest_call"),
    [
        ("gaussian", 3, 40, 15),  # 40 latents a call: all 5 samples of the 3 images at once
        ("logistic_mixture", 3, 40, 6),  # 2 mixtures, 20 outputs for 3: 40 * 3 // 20
        ("logistic_mixture", 1, 1, 1),  # 1 * 3 // 20 = 0: one latent a call still
    ],
)
def test_max_batch_bounds_the_decoder_outputs_of_every_head(kind, images, max_batch, largest_call):
    """eval.max_batch counts latents for a head with one output per image value, fewer for a
    head with more, and the estimates do not depend on how the draws are split."""
    module = make_module(kind=kind)
    calls = []
    module.vae.decoder.register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))

    def estimates(max_batch: int):
        gen = torch.Generator().manual_seed(3)
        x = batch(images)
        return sampled_estimates(module.vae, x, 5, max_batch=max_batch, generator=gen)

    split = estimates(max_batch=max_batch)
    assert max(calls) == largest_call
    for a, b in zip(split, estimates(max_batch=10_000), strict=True):
        torch.testing.assert_close(a, b)


def test_training_on_the_iwae_bound_logs_it_and_validates_on_the_elbo(cifar_dir, tmp_path):
    """A fit with the IWAE objective: its training loss is the K-sample bound, at most the
    one-sample negative ELBO that validation reports, and the weights stay finite."""
    module = VAELitModule(arch=MLP, optimizer=ADAM, latent_dim=4, objective="iwae", iwae_samples=4)
    trainer = fit_in_process(
        module, cifar_dir, tmp_path, batch_size=8, max_steps=6, val_check_interval=3
    )
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/bpd"])
    assert metrics["train/loss"] <= -metrics["train/elbo"] + 1e-3
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("value", [0, True, 1.5])
def test_a_bad_number_of_mixtures_is_refused(value):
    with pytest.raises(ValueError) as refused:
        LogisticMixtureLikelihood(num_mixtures=value)
    expected = f"num_mixtures={value!r} is not allowed: num_mixtures must be an integer >= 1."
    assert str(refused.value) == expected
    assert LogisticMixtureLikelihood(num_mixtures=1).out_channels == 10
    assert LogisticMixtureLikelihood().out_channels == 100  # 10 mixtures by default


@pytest.mark.parametrize(
    ("sigma_mode", "kind"),
    [("fixed", "gaussian"), ("heteroscedastic", "gaussian"), ("fixed", "discretized_gaussian")],
)
def test_the_latent_grid_is_the_sum_over_its_cell_centres_written_out(sigma_mode, kind):
    """log sum_g p(x|z_g) N(z_g; 0, I) dV over the 6 x 6 cell centres of [-3, 3]^2, one point at
    a time through the model's own log-likelihood; the first image is the decoder's mean at one
    centre, so that its squared error there is near 0."""
    torch.manual_seed(0)
    head = head_config(kind, sigma=0.3, sigma_mode=sigma_mode)
    vae = VAELitModule(arch=MLP, optimizer=ADAM, latent_dim=2, likelihood=head).double().vae
    centres = torch.arange(6, dtype=torch.float64) - 2.5
    points = torch.cartesian_prod(centres, centres)
    with torch.no_grad():
        x = torch.cat([vae.decode(points[14:15]), batch(2)])
        log_joint = torch.stack(
            [
                vae.log_likelihood(x, z.expand(len(x), 2)) + Normal(0.0, 1.0).log_prob(z).sum()
                for z in points
            ],
            dim=1,
        )
        grid = grid_log_likelihood(vae, x, 6, 3.0, max_batch=20).log_px
    torch.testing.assert_close(grid, torch.logsumexp(log_joint, dim=1), rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("distribution", [Gaussian, DiscretizedGaussian])
def test_gaussian_samples_have_the_mean_and_spread_of_the_model(distribution):
    loc = torch.tensor([0.2, 0.5, 0.7]).view(1, 3, 1, 1).expand(100_000, 3, 1, 1)
    log_scale = torch.tensor([0.05, 0.1, 0.02]).log().view(1, 3, 1, 1)
    samples = distribution(loc, log_scale).sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        samples.mean(0).flatten(), torch.tensor([0.2, 0.5, 0.7]), atol=2e-3, rtol=0
    )
    if distribution is Gaussian:
        torch.testing.assert_close(
            samples.std(0).flatten(), torch.tensor([0.05, 0.1, 0.02]), atol=2e-3, rtol=0
        )
    else:  # the 8-bit values of the bins: their centres, spread as the Gaussian's mass over them
        torch.testing.assert_close(samples * 256 - 0.5, (samples * 256 - 0.5).round())
        expected = (torch.tensor([0.05, 0.1, 0.02]).square() + 1 / (12 * 256**2)).sqrt()
        torch.testing.assert_close(samples.std(0).flatten(), expected, atol=2e-3, rtol=0)


@pytest.mark.parametrize("distribution", [Gaussian, DiscretizedGaussian, "logistic_mixture"])
def test_samples_follow_the_generator_they_are_given(distribution):
    if distribution == "logistic_mixture":
        p = DiscretizedLogisticMixture(torch.randn(2, 20, 4, 4, dtype=torch.float64), 2)
    else:
        p = distribution(torch.rand(2, 3, 4, 4, dtype=torch.float64), torch.tensor(-3.0))

    def draw(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        return p.sample(torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0, 123), draw(0, 456))  # the global stream plays no part
    assert not torch.equal(draw(0, 123), draw(1, 123))


def test_bins_of_values_at_and_past_the_ends_are_the_end_bins():
    values = torch.tensor([-0.1, 0.0, 0.5 / 256, 255.5 / 256, 1.0, 1.2])
    assert bin_index(values).tolist() == [0, 0, 0, 255, 255, 255]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sigma": 0.0}, "sigma=0.0 is not allowed: sigma must be a number > 0."),
        ({"sigma": "big"}, "sigma='big' is not allowed: sigma must be a number > 0."),
        ({"sigma": True}, "sigma=True is not allowed: sigma must be a number > 0."),
        (
            {"sigma_mode": "free"},
            "sigma_mode='free' is not allowed: sigma_mode must be one of fixed, learned, "
            "optimal, per_pixel, heteroscedastic.",
        ),
    ],
)
def test_a_bad_gaussian_setting_is_refused_by_name(settings, message):
    with pytest.raises(ValueError) as refused:
        GaussianLikelihood(**settings)
    assert str(refused.value) == message


def test_the_optimal_sigma_is_floored_for_a_perfect_reconstruction():
    head = GaussianLikelihood(0.1, "optimal")
    loc = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    p_loss = head.loss_distribution(head(torch.logit(loc)), head(torch.logit(loc)).loc)
    torch.testing.assert_close(p_loss.log_scale, torch.full_like(loc, math.log(1e-3)))
