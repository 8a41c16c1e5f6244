"""A NaN or infinite loss never passes silently: it stops the run, or skips the step."""

import pytest
import torch

from tests.helpers import ADAM, MLP, fit_in_process
from vae_lightning.training.lit_module import VAELitModule
from vae_lightning.training.update_guards import NonFiniteLossError, UpdateGuards


def nan_at_step(module: VAELitModule, bad_step: int) -> None:
    """Make the loss NaN for the batch of global step ``bad_step``."""
    compute = module.compute_terms

    def poisoned(x, *args):
        terms = compute(x, *args)
        if module.trainer.training and module.global_step == bad_step:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    module.compute_terms = poisoned


def fit(module, cifar_dir, tmp_path, epochs=2, guards=None):
    return fit_in_process(
        module,
        cifar_dir,
        tmp_path,
        batch_size=16,
        callbacks=[guards or UpdateGuards()],
        max_epochs=epochs,
        num_sanity_val_steps=0,
    )


def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(cifar_dir, tmp_path):
    module = VAELitModule(arch=MLP, optimizer=ADAM, latent_dim=4)
    nan_at_step(module, bad_step=7)  # 5 steps per epoch: in the second epoch
    with pytest.raises(NonFiniteLossError) as err:
        fit(module, cifar_dir, tmp_path)
    message = str(err.value)
    assert "The loss is nan at step 7 (epoch 1)" in message
    assert f"the last good checkpoint is {tmp_path / 'last.ckpt'}" in message
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 5


def test_nan_loss_can_skip_the_step_instead(cifar_dir, tmp_path):
    module = VAELitModule(arch=MLP, optimizer=ADAM, latent_dim=4)
    snapshots = {}
    compute = module.compute_terms

    def recording(x, *args):  # the weights each training step starts from
        if module.trainer.training:
            weights = [p.detach().flatten() for p in module.parameters()]
            snapshots[module.global_step] = torch.cat(weights)
        return compute(x, *args)

    module.compute_terms = recording
    nan_at_step(module, bad_step=2)
    fit(module, cifar_dir, tmp_path, epochs=1, guards=UpdateGuards(nonfinite_loss="skip"))
    assert sorted(snapshots) == [0, 1, 2, 3, 4]
    assert not torch.equal(snapshots[1], snapshots[2])  # ordinary steps update the weights
    assert torch.equal(snapshots[2], snapshots[3])  # the NaN step changed nothing
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_a_nonfinite_batch_skips_its_whole_accumulated_update(cifar_dir, tmp_path):
    """With two batches per update, a NaN in the first one drops the update they share."""
    module = VAELitModule(arch=MLP, optimizer=ADAM, latent_dim=4)
    guards = UpdateGuards(nonfinite_loss="skip")
    weights: dict[int, torch.Tensor] = {}
    compute = module.compute_terms

    def poisoned(x, *args):
        if module.trainer.training:
            batch = len(weights)
            weights[batch] = torch.cat([p.detach().flatten() for p in module.parameters()])
            terms = compute(x, *args)
            if batch == 2:  # the first batch of the second update
                terms["loss"] = terms["loss"] * float("nan")
            return terms
        return compute(x, *args)

    module.compute_terms = poisoned
    fit_in_process(module, cifar_dir, tmp_path, 8, [guards], max_steps=3, accumulate_grad_batches=2)
    assert not torch.equal(weights[0], weights[2])  # the first update went through
    assert torch.equal(weights[2], weights[4])  # the second, with the NaN batch, did not
    assert not torch.equal(weights[4], torch.cat([p.flatten() for p in module.parameters()]))
    assert guards.nonfinite_skipped == 1
