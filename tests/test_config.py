"""Bad settings are refused before training, with the key and the allowed values."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from vae_lightning.config import ConfigError, validate_config
from vae_lightning.train import CONFIG_DIR


def composed(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def test_defaults_are_valid():
    cfg = composed()
    validate_config(cfg)
    assert cfg.model.latent_dim == 32 and cfg.model.sigma_mode == "fixed"
    assert cfg.model.arch.encoder._target_.endswith("ConvEncoder")
    assert cfg.logger.wandb.mode == "auto"


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("model.latent_dim=0", "model.latent_dim", "integer >= 1"),
        ("model.latent_dim=2.5", "model.latent_dim", "integer >= 1"),
        ("model.latent_dim=abc", "model.latent_dim", "integer >= 1"),
        ("model.sigma=-1", "model.sigma", "> 0"),
        ("model.sigma=0", "model.sigma", "> 0"),
        ("model.sigma_mode=nope", "model.sigma_mode", "fixed, learned, optimal"),
        ("model.beta=-0.5", "model.beta", ">= 0"),
        ("model.optimizer.lr=0", "model.optimizer.lr", "> 0"),
        ("data.batch_size=0", "data.batch_size", "integer >= 1"),
        ("data.num_workers=-1", "data.num_workers", "integer >= 0"),
        ("data.val_fraction=1.5", "data.val_fraction", "between 0 and 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs", "integer >= 1"),
        ("logger.wandb.mode=sometimes", "logger.wandb.mode", "offline"),
        ("ckpt_path=/no/such/file.ckpt", "ckpt_path", "existing checkpoint"),
        ("model.compile=yes", "model.compile", "true or false"),
        ("data.on_device=maybe", "data.on_device", "auto, true or false"),
    ],
)
def test_bad_values_name_key_and_allowed_values(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        validate_config(composed(override))
    message = str(err.value)
    assert message.startswith(f"{key}=") and allowed in message


def test_unknown_architecture_lists_the_options():
    with pytest.raises(MissingConfigException) as err:
        composed("model/arch=nope")
    assert "model/arch" in str(err.value)
    for option in ("conv", "mlp", "resnet"):
        assert option in str(err.value)


@pytest.mark.parametrize("preset", ["sweep_latent_dim", "sweep_sigma", "sweep_arch"])
def test_experiment_presets_define_a_sweep(preset):
    cfg = composed(f"experiment={preset}", hydra=True)
    assert cfg.hydra.sweeper.params, preset
    validate_config(cfg)
