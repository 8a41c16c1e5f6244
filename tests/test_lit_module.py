"""The LightningModule's loss and metric path, in this process: its terms per image, the KL
weight outside a fit, the settings it keeps, and which steps' figures a read collects."""

from types import SimpleNamespace

import pytest
import torch

from tests.helpers import ADAM, MLP, composed, make_module
from vae_lightning.training.lit_module import VAELitModule


@pytest.mark.parametrize("kind", ["gaussian", "logistic_mixture"])
def test_the_terms_of_a_batch_are_the_vae_terms_of_each_image(kind):
    """beta 0.5 and free bits, so the loss is neither -ELBO nor the plain KL; the MSE is per
    pixel; sigma is reported by the heads that have one."""
    module = make_module(kind=kind, beta=0.5, free_bits=0.02)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(1)
    terms = module.compute_terms(x)
    torch.manual_seed(1)
    expected = module.vae.elbo_terms(x, 0.5, 0.02)
    assert ("sigma" in terms) == (kind == "gaussian")
    for name in ("loss", "kl", "elbo", "bpd", "squared_error"):
        torch.testing.assert_close(terms[name], getattr(expected, name))
    torch.testing.assert_close(terms["recon_mse"], expected.squared_error / 3072)
    assert (terms["loss"] + terms["elbo"]).abs().min() > 1e-3


def test_outside_a_fit_the_kl_weight_is_the_full_beta():
    schedule = {"kind": "linear", "start": 0.1, "warmup_steps": 100}
    module = VAELitModule(MLP, ADAM, latent_dim=4, beta=0.7, kl_schedule=schedule)
    assert module.current_beta() == 0.7


def test_the_module_keeps_its_settings_resolved():
    """Built from the nodes of a composed config (as a user's script may build it), its
    interpolations (the cosine schedule's length is trainer.max_epochs) are resolved into the
    plain settings that checkpoints keep."""
    cfg = composed("model/arch=mlp", "model/scheduler=cosine", "trainer.max_epochs=7").model
    module = VAELitModule(cfg.arch, cfg.optimizer, latent_dim=4, scheduler=cfg.scheduler)
    assert module.hparams.scheduler["T_max"] == 7
    assert type(module.hparams.arch) is dict and type(module.hparams.optimizer) is dict


def test_a_read_between_the_batches_of_an_update_leaves_them_for_the_next():
    """A checkpoint written while batches accumulate into an update (one on a timer, or on a
    signal) counts none of that update's images; they count once it is done."""
    module = VAELitModule(MLP, ADAM, latent_dim=4)
    module._trainer = SimpleNamespace(world_size=1, global_step=0)
    x = torch.rand(3, 3, 32, 32)
    saved: dict = {}
    module.training_step((x, None), 0)
    module.on_save_checkpoint(saved)
    assert saved["images_trained"] == 0
    module.training_step((x[:2], None), 1)
    module.on_before_optimizer_step(None)
    module.training_step((x, None), 2)  # the next update's first batch
    module.on_save_checkpoint(saved)
    assert saved["images_trained"] == 5
    module.on_save_checkpoint(saved)
    assert saved["images_trained"] == module.images_trained == 5
    module.on_before_optimizer_step(None)
    module.on_train_epoch_end()
    assert module.images_trained == 8
