"""Bad settings are refused before training, with the key and the allowed values."""

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from tests.helpers import composed
from vae_lightning.config import validate_config, validate_eval_config
from vae_lightning.errors import ConfigError
from vae_lightning.train import train

GUARDS = "callbacks.update_guards"


def assert_refused(validate, cfg, key: str, allowed: str) -> None:
    """``validate(cfg)`` raises a ConfigError that names ``key`` and the ``allowed`` values."""
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert message.startswith(f"{key}=") and allowed in message


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
        (
            "model/likelihood=logistic_mixture model.likelihood.num_mixtures=0",
            "model.likelihood.num_mixtures",
            "integer >= 1",
        ),
        ("model.beta=-0.5", "model.beta", ">= 0"),
        ("model.optimizer.lr=0", "model.optimizer.lr", "> 0"),
        ("data.batch_size=0", "data.batch_size", "integer >= 1"),
        ("data.num_workers=-1", "data.num_workers", "integer >= 0"),
        ("data.val_fraction=1.5", "data.val_fraction", "between 0 and 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs", "integer >= 1"),
        ("logger.wandb.mode=sometimes", "logger.wandb.mode", "offline"),
        ("logger.wandb.log_model=1", "logger.wandb.log_model", "false, true or all"),
        ("ckpt_path=/no/such/file.ckpt", "ckpt_path", "existing checkpoint"),
        ("model.compile=yes", "model.compile", "true or false"),
        ("data.on_device=maybe", "data.on_device", "auto, true or false"),
        ("paths.data_dir=123", "paths.data_dir", "a folder path"),
        ("data.data_dir=[a,b]", "data.data_dir", "a folder path"),
        ("paths.output_root=", "paths.output_root", "a folder path"),
        ("tags=baseline", "tags", "a list of names"),
        ("model.free_bits=-1", "model.free_bits", ">= 0"),
        ("+model.sigm=0.2", "model.sigm", "nothing reads model.sigm. The model's settings are"),
        ("model/likelihood=logistic_mixture +model.sigma=0.3", "model.sigma", "nothing reads"),
        (f"{GUARDS}.skip_grad_norm=0", f"{GUARDS}.skip_grad_norm", "null or a number > 0"),
        (f"{GUARDS}.nonfinite_loss=go", f"{GUARDS}.nonfinite_loss", "stop or skip"),
        ("model.kl_schedule.kind=cosine", "model.kl_schedule.kind", "constant, linear, cyclical"),
        ("model.objective=vi", "model.objective", "elbo or iwae"),
        ("model.objective=iwae model.iwae_samples=0", "model.iwae_samples", "integer >= 1"),
        (
            "model.objective=iwae model.beta=0.5 model.free_bits=0.1",
            "model.objective",
            "no model.beta, model.free_bits (set to 0.5, 0.1)",
        ),
    ],
)
def test_bad_values_name_key_and_allowed_values(override, key, allowed):
    assert_refused(validate_config, composed(*override.split()), key, allowed)


def test_a_gaussian_setting_cannot_be_written_for_another_likelihood():
    """The sigma settings exist only in the Gaussian heads' files: no check is needed to refuse
    them with the logistic mixture, whose decoder outputs every scale."""
    assert composed("model/likelihood=discretized_gaussian", "model.sigma=0.3").model.sigma == 0.3
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'model\.sigma_mode'"):
        composed("model/likelihood=logistic_mixture", "model.sigma_mode=learned")


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("eval.num_samples=0", "eval.num_samples", "integer >= 1"),
        ("eval.prior_sampling=maybe", "eval.prior_sampling", "true or false"),
        ("eval.limit=1", "eval.limit", "null or >= 2"),
        ("eval.grid_limit=0", "eval.grid_limit", "> 0"),
        ("eval.fid.network=vgg", "eval.fid.network", "one of tf_inception, torch_fidelity"),
        ("eval.fid.num_samples=1", "eval.fid.num_samples", "integer >= 2"),
        ("eval.fid.batch_size=1", "eval.fid.batch_size", "null or an integer >= 2"),
        ("eval.fid.enabled=1", "eval.fid.enabled", "true or false"),
    ],
)
def test_bad_evaluation_values_name_key_and_allowed_values(override, key, allowed):
    validate_eval_config(composed("ckpt_path=null", config="eval"))
    bad = composed("ckpt_path=null", override, config="eval")
    assert_refused(validate_eval_config, bad, key, allowed)


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


@pytest.mark.parametrize(
    ("override", "key", "reason"),
    # a value of the wrong type or out of range in each config group
    [
        ("+data.shuffle_buffer=5", "data", "unexpected keyword argument 'shuffle_buffer'"),
        ("model.arch.encoder.channels=abc", "model", "channels='abc': it must be a list of"),
        ("model.arch.decoder.channels=[8,8,8,8,8,8]", "model", "at most 5 entries"),
        ("+model.arch.decoder.width=3", "model", "unexpected keyword argument 'width'"),
        ("model/arch=mlp model.arch.encoder.hidden_dims=[0]", "model", "hidden_dims=[0]"),
        ("model/arch=resnet model.arch.decoder.blocks_per_stage=0", "model", "blocks_per_stage=0"),
        ("trainer.precision=fp7", "trainer", "Precision 'fp7' is invalid"),
        ("trainer.accelerator=tpu9", "trainer", "tpu9"),
        ("trainer.devices=0", "trainer", "devices"),
        ("trainer.strategy=fastest", "trainer", "fastest"),
        ("callbacks.last_checkpoint.every_n_train_steps=-3", "callbacks.last_checkpoint", "-3"),
        ("callbacks.model_checkpoint.mode=up", "callbacks.model_checkpoint", "up"),
        ("callbacks.image_grids.every_n_epochs=0", "callbacks.image_grids", "every_n_epochs=0"),
        ("callbacks.image_grids.num_images=many", "callbacks.image_grids", "num_images='many'"),
        ("+logger.csv.flush_every=x", "logger.csv", "flush_every"),
    ],
)
def test_settings_a_constructor_refuses_name_the_group_and_the_reason(
    override, key, reason, tmp_path
):
    overrides = ["logger=csv", f"paths.output_dir={tmp_path}", *override.split()]
    with pytest.raises(ConfigError) as err:
        train(composed(*overrides))
    message = str(err.value)
    assert message.startswith(f"{key} was refused by ") and reason in message, message
    assert f"Fix the {key}.* settings" in message
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_update_guards_are_a_callback_that_can_be_switched_off():
    assert composed().callbacks.update_guards.nonfinite_loss == "stop"
    cfg = composed("~callbacks.update_guards")
    validate_config(cfg)
    assert "update_guards" not in cfg.callbacks


def test_a_cyclical_schedule_needs_a_run_of_known_length():
    cfg = composed("model.kl_schedule.kind=cyclical", "trainer.max_epochs=-1")
    with pytest.raises(ConfigError, match="needs a run of known length"):
        validate_config(cfg)
