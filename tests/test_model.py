"""The VAE's sampling and sigma modes, and the LightningModule's loss and reported metrics."""

import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributions import Normal

from tests.helpers import ADAM, MLP, head_config, make_module
from vae_lightning.core.elbo import bits_per_dim
from vae_lightning.core.likelihoods import SIGMA_MIN
from vae_lightning.training.callbacks import side_by_side
from vae_lightning.training.lit_module import VAELitModule

D = 3 * 32 * 32


def batch(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def posterior_draw(module: VAELitModule, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """mu, log-variance and decoder mean of one posterior draw z = mu + sigma_q * eps: the draw
    ``compute_terms`` takes after the same seed."""
    mu, logvar = module.vae.encode(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    return mu, logvar, module.vae.decode(z)


def test_reparameterization_has_the_posterior_moments_and_passes_gradients():
    mu = torch.tensor([[1.0, -2.0]], requires_grad=True)
    logvar = torch.tensor([[0.0, math.log(0.25)]], requires_grad=True)
    torch.manual_seed(0)
    z = make_module().vae.reparameterize(mu.expand(200_000, 2), logvar.expand(200_000, 2))
    torch.testing.assert_close(z.mean(0), torch.tensor([1.0, -2.0]), atol=0.01, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 0.5]), atol=0.01, rtol=0)
    z.sum().backward()
    assert mu.grad is not None and logvar.grad is not None and logvar.grad.abs().sum() > 0


def test_fixed_sigma_loss_and_metrics():
    module = make_module(sigma=0.2, beta=1.0)
    x = batch()
    torch.manual_seed(11)
    terms = module.compute_terms(x)
    torch.manual_seed(11)  # the same posterior draw, recomputed with torch.distributions
    mu, logvar, x_hat = posterior_draw(module, x)
    recon_log_p = Normal(x_hat, 0.2).log_prob(x).flatten(1).sum(1)
    sq = (x - x_hat).pow(2).flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
    # The training objective is the negative ELBO: ||x - x_hat||^2 / (2 sigma^2) + KL + constant.
    torch.testing.assert_close(terms["elbo"], recon_log_p - kl)
    torch.testing.assert_close(terms["loss"], -terms["elbo"])
    constant = D * math.log(0.2) + 0.5 * D * math.log(2 * math.pi)
    torch.testing.assert_close(
        terms["loss"] - sq / (2 * 0.2**2) - kl, torch.full_like(kl, constant)
    )
    torch.testing.assert_close(terms["recon_mse"], sq / D)
    torch.testing.assert_close(terms["bpd"], bits_per_dim(recon_log_p - kl, D))


def test_beta_weights_only_the_training_loss():
    x = batch()
    torch.manual_seed(11)
    base = make_module(beta=1.0).compute_terms(x)
    torch.manual_seed(11)
    weighted = make_module(beta=0.25).compute_terms(x)
    torch.testing.assert_close(weighted["elbo"], base["elbo"])
    torch.testing.assert_close(weighted["loss"], base["loss"] - 0.75 * base["kl"])


def test_learned_sigma_is_a_parameter_with_the_full_negative_log_likelihood():
    module = make_module(sigma=0.3, sigma_mode="learned")
    log_sigma = module.vae.likelihood.log_sigma
    assert any(p is log_sigma for p in module.parameters())
    x = batch()
    torch.manual_seed(11)
    terms = module.compute_terms(x)
    # loss = -log p(x|z) + KL: sigma gets a gradient from both terms of log p(x|z).
    torch.testing.assert_close(terms["loss"], -terms["elbo"], rtol=1e-10, atol=1e-8)
    terms["loss"].mean().backward()
    sq = terms["squared_error"].detach()
    # d/d log sigma of sq/(2 sigma^2) + D log sigma = -sq/sigma^2 + D
    sigma_sq = log_sigma.detach().exp() ** 2  # 0.3, as stored in float32
    expected = (-sq / sigma_sq + D).mean()
    torch.testing.assert_close(log_sigma.grad, expected)


def test_optimal_sigma_uses_per_image_mse_and_reports_with_a_running_sigma():
    module = make_module(sigma=0.5, sigma_mode="optimal")
    x = batch()
    torch.manual_seed(11)
    terms = module.compute_terms(x)
    mse = terms["recon_mse"]
    # sigma_i^2 = mse_i: loss = D/2 + (D/2) log(2 pi mse_i) + KL
    expected_loss = 0.5 * D + 0.5 * D * (2 * math.pi * mse).log() + terms["kl"]
    torch.testing.assert_close(terms["loss"], expected_loss)
    # ... whose gradient equals that of the loss with sigma_i held fixed (envelope theorem).
    grads = torch.autograd.grad(terms["loss"].sum(), module.vae.decoder.parameters())
    torch.manual_seed(11)
    _, _, x_hat = posterior_draw(module, x)
    sq = (x - x_hat).pow(2).flatten(1).sum(1)
    held = sq / (2 * mse.detach())
    held_grads = torch.autograd.grad(held.sum(), module.vae.decoder.parameters())
    for g, h in zip(grads, held_grads, strict=True):
        torch.testing.assert_close(g, h)
    # Reported likelihoods use the data-independent sigma (here still its start value 0.5).
    likelihood = module.vae.likelihood
    assert likelihood.scalar_log_sigma().exp().item() == pytest.approx(0.5)
    # A training step moves sigma^2 towards the batch MSE by the momentum.
    likelihood.update_running_sigma(terms["squared_error"].sum() / D, torch.tensor(len(x)))
    expected = 0.25 + 0.01 * (mse.mean().item() - 0.25)
    assert likelihood.scalar_log_sigma().exp().item() ** 2 == pytest.approx(expected)


def test_sigma_is_floored():
    module = make_module(sigma=1e-6)
    assert module.vae.likelihood.scalar_log_sigma().exp().item() == pytest.approx(SIGMA_MIN)


def test_prior_samples_have_image_shape_and_follow_the_generator():
    module = make_module()
    a = module.vae.sample(3, generator=torch.Generator().manual_seed(5))
    b = module.vae.sample(3, generator=torch.Generator().manual_seed(5))
    assert a.shape == (3, 3, 32, 32)
    torch.testing.assert_close(a, b)


def test_training_step_reduces_the_loss_on_a_fixed_batch():
    module = make_module().float()
    colors = torch.rand(6, 3, 1, 1, generator=torch.Generator().manual_seed(3))
    x = colors.expand(6, 3, 32, 32).contiguous()  # flat colours: learnable in a few steps
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    losses = []
    for _ in range(100):
        optimizer.zero_grad()
        loss = module.compute_terms(x)["loss"].mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_module_round_trips_through_its_hyperparameters(tmp_path):
    module = make_module(sigma=0.2, sigma_mode="learned")
    rebuilt = VAELitModule(**module.hparams).double()
    assert rebuilt.hparams == module.hparams
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(
        p.numel() for p in module.parameters()
    )


CONV = {
    "encoder": {"_target_": "vae_lightning.core.architectures.ConvEncoder", "channels": [8, 16]},
    "decoder": {"_target_": "vae_lightning.core.architectures.ConvDecoder", "channels": [16, 8]},
}


def test_bf16_autocast_keeps_every_reduction_in_fp32():
    module = make_module(sigma=0.2).float()
    x = batch().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(11)
        terms = module.compute_terms(x)
        torch.manual_seed(11)  # the same bf16 network outputs, for the same (fp32) posterior draw
        mu, logvar = module.vae.encode(x)
        z = mu.float() + torch.exp(0.5 * logvar.float()) * torch.randn(mu.shape)
        raw = module.vae.decoder(z)
    assert mu.dtype == torch.bfloat16 and raw.dtype == torch.bfloat16
    # The same outputs reduced by hand in float64: a bf16 sum over 3072 pixels would be ~1e-2 off.
    mu, logvar = mu.double(), logvar.double()
    x_hat = raw.double().sigmoid()
    sq = (x.double() - x_hat).pow(2).flatten(1).sum(1)
    kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
    for name in ("loss", "elbo", "kl", "bpd", "recon_mse"):
        assert terms[name].dtype == torch.float32, name
    recon = sq / (2 * 0.2**2) + D * math.log(0.2) + 0.5 * D * math.log(2 * math.pi)
    torch.testing.assert_close(terms["loss"].double(), recon + kl, rtol=1e-5, atol=0)
    torch.testing.assert_close(terms["recon_mse"].double(), sq / D, rtol=1e-5, atol=0)


def test_channels_last_gives_the_same_numbers():
    torch.manual_seed(0)
    plain = VAELitModule(arch=CONV, optimizer=ADAM, latent_dim=4)
    nhwc = VAELitModule(arch=CONV | {"channels_last": True}, optimizer=ADAM, latent_dim=4)
    nhwc.load_state_dict(plain.state_dict())
    conv = nhwc.vae.encoder[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = batch().float()
    torch.manual_seed(3)
    a = plain.compute_terms(x)
    torch.manual_seed(3)
    b = nhwc.compute_terms(x)
    for name in ("loss", "elbo"):
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-3)


def test_compiled_module_matches_eager_in_loss_and_gradients():
    """Encoder, decoder and the likelihood's terms compiled (the logistic mixture's, the most
    operations) give the eager loss and gradients."""
    likelihood = head_config("logistic_mixture", num_mixtures=3)
    torch.manual_seed(0)
    modules = [
        VAELitModule(
            arch=MLP, optimizer=ADAM, latent_dim=4, likelihood=likelihood, compile=c
        ).double()
        for c in (False, True)
    ]
    modules[1].load_state_dict(modules[0].state_dict())  # same keys: compiled in place
    x = batch(2)
    for module in modules:
        torch.manual_seed(3)
        module.compute_terms(x)["loss"].sum().backward()
    eager, compiled = (dict(m.named_parameters()) for m in modules)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in compiled.values())
    for name, parameter in eager.items():
        torch.testing.assert_close(compiled[name].grad, parameter.grad, rtol=1e-9, atol=1e-9)


def test_compile_settings_reach_the_encoder_the_decoder_and_the_likelihood_terms():
    """``VAE.compile(**settings)`` compiles the three parts with those settings: here a backend
    that records each graph it gets, among them the likelihood terms' (decoder outputs in)."""
    inputs_of_graphs = []

    def recording_backend(graph, example_inputs):
        inputs_of_graphs.append([tuple(t.shape) for t in example_inputs if torch.is_tensor(t)])
        return graph.forward

    likelihood = head_config("logistic_mixture", num_mixtures=3)
    module = VAELitModule(arch=MLP, optimizer=ADAM, latent_dim=4, likelihood=likelihood).double()
    torch.compiler.reset()  # graphs cached by earlier compiles would not reach the backend
    module.vae.compile(backend=recording_backend)
    module.compute_terms(batch(2))
    decoder_outputs = (2, 30, 32, 32)  # 10 channels per mixture component
    assert len(inputs_of_graphs) >= 3
    assert any(decoder_outputs in shapes for shapes in inputs_of_graphs)


def test_adam_and_sgd_are_fused_unless_the_config_chooses():
    def defaults(**optimizer) -> dict:
        module = VAELitModule(arch=MLP, optimizer={"_partial_": True, **optimizer}, latent_dim=4)
        return module.configure_optimizers().defaults

    assert defaults(**ADAM)["fused"] is True
    assert defaults(_target_="torch.optim.SGD", lr=0.1, momentum=0.9)["fused"] is True
    foreach = defaults(**ADAM, foreach=True)
    assert foreach["foreach"] is True and not foreach["fused"]
    assert "fused" not in defaults(_target_="torch.optim.RMSprop", lr=1e-3)


def test_the_best_val_bpd_so_far_travels_with_the_checkpoint():
    module = make_module()
    module.best_val_bpd = 6.5
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    resumed = make_module()
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.best_val_bpd == 6.5
    # a checkpoint written before the module kept it: the best of its val/bpd ModelCheckpoint
    monitored, last = ModelCheckpoint(monitor="val/bpd"), ModelCheckpoint(save_last=True)
    monitored.best_model_score = torch.tensor(6.8632)
    older = {"state_dict": module.state_dict()}
    older["callbacks"] = {
        monitored.state_key: monitored.state_dict(),
        last.state_key: last.state_dict(),
    }
    resumed.on_load_checkpoint(older)
    assert resumed.best_val_bpd == pytest.approx(6.8632)
    resumed.on_load_checkpoint({"state_dict": module.state_dict()})
    assert resumed.best_val_bpd == math.inf


def test_the_forward_pass_reconstructs_at_mu_and_draws_no_random_numbers():
    """Lightning's model summary runs it on an example input: it must leave a run's random
    stream as it was. Training and evaluation grids lay reconstructions out alike."""
    module = make_module()
    x = batch()
    state = torch.get_rng_state()
    reconstruction = module(x)
    assert torch.equal(torch.get_rng_state(), state)
    mu = module.vae.encode(x)[0]
    torch.testing.assert_close(reconstruction, torch.sigmoid(module.vae.decoder(mu)))
    pairs = side_by_side(x, reconstruction)
    assert torch.equal(pairs[0::2], x) and torch.equal(pairs[1::2], reconstruction)
