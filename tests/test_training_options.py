"""Training options researchers compare: KL schedules, free bits, skipped updates, EMA."""

import logging
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from tests.helpers import ADAM, MLP, PerturbDecoderAt, composed, fit_in_process
from vae_lightning.config import validate_config
from vae_lightning.core.elbo import kl_to_standard_normal
from vae_lightning.core.kl_schedule import KLSchedule
from vae_lightning.core.vae import VAE
from vae_lightning.errors import ConfigError
from vae_lightning.training.lit_module import DIVERGED_BPD, VAELitModule
from vae_lightning.training.update_guards import STUCK_WINDOW, UpdateGuards


def test_constant_and_linear_warm_up():
    assert [KLSchedule()(step, 0.7, 100) for step in (0, 50, 10**6)] == [0.7, 0.7, 0.7]
    warm_up = KLSchedule(kind="linear", start=0.1, warmup_steps=10)
    values = [warm_up(step, 1.1, float("inf")) for step in (0, 5, 10, 11, 1000)]
    assert values == pytest.approx([0.1, 0.6, 1.1, 1.1, 1.1])


def test_cyclical_annealing_rises_over_the_first_ratio_of_each_cycle():
    """100 steps, 4 cycles of 25; beta rises over the first 10 steps of each (ratio 0.4)."""
    schedule = KLSchedule(kind="cyclical", cycles=4, ratio=0.4)
    values = [schedule(step, 2.0, 100) for step in (0, 5, 10, 20, 24, 25, 30, 99)]
    assert values == pytest.approx([0.0, 1.0, 2.0, 2.0, 2.0, 0.0, 1.0, 2.0])


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"kind": "cosine"}, "kind='cosine' is not allowed: kind must be one of constant, linear"),
        (
            {"warmup_steps": 0},
            "warmup_steps=0 is not allowed: warmup_steps must be an integer >= 1.",
        ),
        ({"cycles": 0}, "cycles=0 is not allowed: cycles must be an integer >= 1."),
        ({"ratio": 0.0}, "ratio=0.0 is not allowed: ratio must be in (0, 1]."),
        ({"ratio": 1.5}, "ratio=1.5 is not allowed: ratio must be in (0, 1]."),
        ({"start": -1.0}, "start=-1.0 is not allowed: start must be a number >= 0."),
        ({"start": "0"}, "start='0' is not allowed: start must be a number >= 0."),
    ],
)
def test_bad_schedules_are_refused(setting, message):
    with pytest.raises(ValueError) as refused:
        KLSchedule(**setting)
    assert str(refused.value).startswith(message)


def test_a_schedule_may_spend_every_cycle_rising():
    assert KLSchedule(kind="cyclical", cycles=1, ratio=1.0)(50, 2.0, 100) == pytest.approx(1.0)


class FixedPosterior(nn.Module):
    """An encoder whose posterior is the same learnable (mu, logvar) for every image."""

    def __init__(self, mu: list[float], logvar: list[float]) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu, dtype=torch.float64))
        self.logvar = nn.Parameter(torch.tensor(logvar, dtype=torch.float64))

    def forward(self, x):
        return torch.cat([self.mu, self.logvar]).expand(len(x), -1)


class ConstantDecoder(nn.Module):
    """x_hat ignores z, so only the KL term sends gradients to the posterior."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Parameter(torch.full((3, 32, 32), 0.5, dtype=torch.float64))

    def forward(self, z):
        return self.image.expand(len(z), -1, -1, -1)


def test_free_bits_give_no_gradient_to_dimensions_under_the_floor():
    mu, logvar = [0.1, 2.0, 0.0, 3.0], [0.0, 0.0, -0.2, 0.5]
    encoder = FixedPosterior(mu, logvar)
    vae = VAE(encoder, ConstantDecoder(), latent_dim=4).double()
    x = torch.rand(5, 3, 32, 32, dtype=torch.float64)
    terms = vae.elbo_terms(x, beta=1.0, free_bits=0.5)
    (terms.loss.mean()).backward()
    m, v = torch.tensor(mu, dtype=torch.float64), torch.tensor(logvar, dtype=torch.float64)
    kl_per_dim = 0.5 * (m**2 + v.exp() - 1 - v)
    under = kl_per_dim < 0.5
    assert under.tolist() == [True, False, True, False]
    assert encoder.mu.grad[under].abs().max() == 0 and encoder.logvar.grad[under].abs().max() == 0
    # above the floor: the gradient of the plain KL, d/dmu = mu and d/dlogvar = (exp(logvar) - 1)/2
    torch.testing.assert_close(encoder.mu.grad[~under], m[~under])
    torch.testing.assert_close(encoder.logvar.grad[~under], (v[~under].exp() - 1) / 2)
    # the reported KL is the true one
    true_kl = kl_to_standard_normal(*encoder(x).chunk(2, dim=1))
    torch.testing.assert_close(terms.kl, true_kl)
    loss_kl = terms.loss + terms.log_likelihood
    torch.testing.assert_close(loss_kl, kl_per_dim.clamp_min(0.5).sum().expand(5))


def _fit(module: VAELitModule, cifar_dir, tmp_path, max_steps: int, callbacks=()) -> L.Trainer:
    return fit_in_process(
        module, cifar_dir, tmp_path, 8, callbacks, max_steps=max_steps, limit_val_batches=0
    )


def test_updates_over_the_gradient_norm_threshold_are_skipped_and_a_stuck_run_says_so(
    cifar_dir, tmp_path, caplog
):
    module = VAELitModule(arch=MLP, optimizer=ADAM, latent_dim=4)
    guards = UpdateGuards(skip_grad_norm=1e-9)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        trainer = _fit(module, cifar_dir, tmp_path, STUCK_WINDOW + 1, [guards])
    assert guards.skipped_updates == STUCK_WINDOW + 1
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for state in trainer.optimizers[0].state.values():  # as Adam starts: no step, no moments
        assert state["step"] == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    stuck = [r.getMessage() for r in caplog.records if "Training is stuck" in r.getMessage()]
    assert len(stuck) == 1 and "100% of the last 100 updates were skipped" in stuck[0]
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["skipped_updates"] == STUCK_WINDOW + 1


def test_updates_under_the_threshold_go_through(cifar_dir, tmp_path):
    module = VAELitModule(arch=MLP, optimizer=ADAM, latent_dim=4)
    guards = UpdateGuards(skip_grad_norm=1e9)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    _fit(module, cifar_dir, tmp_path, 3, [guards])
    assert guards.skipped_updates == 0
    assert not torch.equal(
        before["vae.decoder.0.0.weight"], module.state_dict()["vae.decoder.0.0.weight"]
    )


@pytest.mark.parametrize(
    ("scale", "kl_schedule", "warnings"),
    [
        (0.0, None, 0),
        (3.0, None, 1),
        (3.0, {"kind": "linear", "start": 0.0, "warmup_steps": 1000}, 0),  # beta still rising
    ],
)
def test_a_diverged_run_says_so_once_and_names_its_best_checkpoint(
    cifar_dir, tmp_path, caplog, scale, kl_schedule, warnings
):
    module = VAELitModule(arch=MLP, optimizer=ADAM, latent_dim=4, kl_schedule=kl_schedule)
    bpd = []

    class RecordValBpd(L.Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                bpd.append(float(trainer.callback_metrics["val/bpd"]))

    best = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/bpd")
    callbacks = [PerturbDecoderAt(0, scale), RecordValBpd(), best]
    with caplog.at_level(logging.WARNING):
        fit_in_process(module, cifar_dir, tmp_path, 8, callbacks, max_epochs=3)
    diverged = [r.getMessage() for r in caplog.records if "diverged" in r.getMessage()]
    assert len(bpd) == 3 and all(map(math.isfinite, bpd))
    assert (max(bpd[1:]) - bpd[0] > DIVERGED_BPD) == (scale > 0)
    assert len(diverged) == warnings
    if warnings:
        assert f"val/bpd {bpd[1]:.3f} at epoch 1" in diverged[0]
        assert f"the run's best, {bpd[0]:.3f} (checkpoint {tmp_path / 'best.ckpt'})" in diverged[0]
        assert "model.optimizer.lr" in diverged[0]


def test_the_schedule_sets_the_training_loss_beta(cifar_dir, tmp_path):
    schedule = {"kind": "linear", "start": 0.0, "warmup_steps": 4}
    module = VAELitModule(arch=MLP, optimizer=ADAM, latent_dim=4, beta=2.0, kl_schedule=schedule)
    seen = []
    compute = module.compute_terms

    def recording(x, *args):
        if module.trainer.training:
            seen.append(module.current_beta())
        return compute(x, *args)

    module.compute_terms = recording
    _fit(module, cifar_dir, tmp_path, max_steps=6)
    assert seen == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0])


def test_ema_weights_are_what_the_checkpoint_and_the_module_hold_after_training(
    cifar_dir, tmp_path
):
    """Lightning's EMAWeightAveraging (callbacks=[default,ema]) against an EMA computed here
    from the raw weights after every step."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    module = VAELitModule(arch=MLP, optimizer=ADAM, latent_dim=4)
    raw: list[dict[str, torch.Tensor]] = []

    class RecordRawWeights(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            raw.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    callbacks = [RecordRawWeights(), EMAWeightAveraging(decay=0.5)]
    _fit(module, cifar_dir, tmp_path, max_steps=4, callbacks=callbacks)
    assert len(raw) == 4
    expected = dict(raw[0])
    for weights in raw[1:]:
        expected = {k: 0.5 * expected[k] + 0.5 * weights[k] for k in expected}
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    for key in ("vae.encoder.1.0.weight", "vae.decoder.0.0.weight"):
        torch.testing.assert_close(saved["state_dict"][key], expected[key])
        torch.testing.assert_close(module.state_dict()[key], expected[key])
        torch.testing.assert_close(saved["current_model_state"][key], raw[-1][key])
        assert not torch.equal(expected[key], raw[-1][key])


def test_a_cosine_schedule_decays_the_learning_rate_per_epoch_also_across_a_resume(
    cifar_dir, tmp_path
):
    cosine = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True}
    settings = {"arch": MLP, "optimizer": ADAM, "latent_dim": 4, "scheduler": cosine | {"T_max": 4}}
    lr = ADAM["lr"]
    trainer = fit_in_process(VAELitModule(**settings), cifar_dir, tmp_path, 16, max_epochs=2)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lr / 2)  # cos(pi/2)
    resumed = fit_in_process(
        VAELitModule(**settings),
        cifar_dir,
        tmp_path,
        16,
        ckpt_path=tmp_path / "last.ckpt",
        max_epochs=3,
    )
    expected = lr * (1 + math.cos(3 * math.pi / 4)) / 2
    assert resumed.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)


def test_a_cosine_schedule_without_a_length_is_refused():
    cfg = composed("model/scheduler=cosine", "trainer.max_epochs=-1")
    with pytest.raises(ConfigError, match=r"model.scheduler.T_max=-1 is not allowed"):
        validate_config(cfg)
