"""Posterior-collapse diagnostics: mutual information, active units, and their logging."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from tests.helpers import ADAM, MLP
from vae_lightning.core.posterior import active_units, mutual_information
from vae_lightning.data.cifar10 import CIFAR10DataModule
from vae_lightning.training.latent_usage import LatentUsage
from vae_lightning.training.lit_module import VAELitModule


def test_mutual_information_matches_torch_distributions():
    """log q(z|x) of each image's own posterior minus the log of the batch's mixture."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 3, generator=g, dtype=torch.float64)
    logvar = torch.randn(6, 3, generator=g, dtype=torch.float64) * 0.5
    z = mu + torch.exp(0.5 * logvar) * torch.randn(6, 3, generator=g, dtype=torch.float64)
    posteriors = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
    uniform = Categorical(logits=torch.zeros(6, dtype=torch.float64))
    aggregate = MixtureSameFamily(uniform, posteriors)
    expected = (posteriors.log_prob(z) - aggregate.log_prob(z)).mean()
    torch.testing.assert_close(mutual_information(mu, logvar, z), expected)


def test_mutual_information_of_a_shared_posterior_and_of_separate_ones():
    shared = torch.zeros(8, 4, dtype=torch.float64)
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert mutual_information(shared, shared, z).abs() < 1e-12  # z says nothing about x
    far = torch.arange(8, dtype=torch.float64)[:, None].expand(8, 4) * 100
    tiny = torch.full((8, 4), -10.0, dtype=torch.float64)
    mi = mutual_information(far, tiny, far + 0.01 * torch.randn(8, 4, dtype=torch.float64))
    assert mi == pytest.approx(math.log(8), abs=1e-9)  # z names its image


def test_active_units_count_the_dimensions_over_the_threshold():
    assert active_units(torch.tensor([0.5, 0.001, 0.02, 0.0]), threshold=0.01) == 2
    assert active_units(torch.tensor([0.01, 0.0100001]), threshold=0.01) == 1  # over, not at
    assert active_units(torch.tensor([0.005, 0.02])) == 1  # the documented default, 0.01


def test_validation_logs_latent_usage_and_a_kl_histogram(cifar_dir, tmp_path):
    L.seed_everything(0)
    module = VAELitModule(arch=MLP, optimizer=ADAM, latent_dim=4)
    usage = LatentUsage()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        log_every_n_steps=1,
        logger=TensorBoardLogger(tmp_path, name="tb", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[usage],
    )
    dm = CIFAR10DataModule(
        str(cifar_dir), batch_size=8, num_workers=0, download=False, dequantize=False
    )
    trainer.fit(module, datamodule=dm)
    # at most log(8) for batches of 8 (each image's own posterior is in the mixture)
    assert float(trainer.callback_metrics["val/mutual_info"]) <= math.log(8) + 1e-9

    # The variance of the posterior means over the validation images, computed here: with the
    # threshold between its second and third largest values, exactly 2 units are active.
    with torch.no_grad():
        x = (dm.val_set.tensors[0].double() + 0.5) / 256
        variance = module.vae.double().encode(x)[0].var(dim=0, unbiased=False).sort().values
    module.float()
    usage.active_threshold = float(variance[1] + variance[2]) / 2
    trainer.validate(module, datamodule=dm, verbose=False)
    assert float(trainer.callback_metrics["val/active_units"]) == 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    assert "val/kl_per_dim" in events.Tags()["histograms"]
