"""Checks of the composed config, so that bad settings fail before any data or model is built."""

import inspect
import json
import re
from collections.abc import Callable
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from vae_lightning.core.kl_schedule import KLSchedule
from vae_lightning.errors import ConfigError, first_line
from vae_lightning.evaluation.feature_networks import check_network
from vae_lightning.launch.run_files import flatten
from vae_lightning.training.checkpoint_format import current_settings
from vae_lightning.training.checkpoints import read_checkpoint
from vae_lightning.training.loggers import check_wandb_settings


def build(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` of the node at ``key``; a constructor that refuses its
    settings raises ``ConfigError``: the constructor's own, its setting named by its full key,
    when it raised one; else one naming the node and the constructor's reason."""
    node = OmegaConf.select(cfg, key)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
        reason: BaseException = err
        while isinstance(reason, InstantiationException) and reason.__cause__:
            if nested := re.search(r"target '([^']+)'", str(reason)):
                target = nested.group(1)  # a nested object (an encoder, say) refused
            reason = reason.__cause__
        if isinstance(reason, ConfigError) and (keyed := _with_full_key(str(reason), node, key)):
            raise ConfigError(keyed) from None
        raise ConfigError(
            f"{key} was refused by {target}: {type(reason).__name__}: {str(reason).rstrip('.')}. "
            f"Fix the {key}.* settings (python -m vae_lightning.train --cfg job shows them)."
        ) from None


def check_settings(cfg: DictConfig, key: str, constructor: Callable[..., Any]) -> None:
    """Build ``constructor`` from the settings at ``key``, as the model will: the one place
    their values are checked, run before any work. Its ``ConfigError`` names the full key."""
    node = OmegaConf.select(cfg, key)
    try:
        constructor(**OmegaConf.to_container(node, resolve=True))
    except ConfigError as err:
        keyed = _with_full_key(str(err), node, key)
        if keyed is None:
            raise
        raise ConfigError(keyed) from None


def _with_full_key(message: str, node: Any, key: str) -> str | None:
    """A constructor's ``ConfigError`` message that starts with ``setting=``, a setting of the
    node at ``key``, with the setting named by the key a user sets it by: its full key, or the
    key it is interpolated from (``${..sigma}`` in ``model.likelihood`` is ``model.sigma``)."""
    found = re.match(r"(\w+)=", message)
    if not found or not isinstance(node, DictConfig) or found.group(1) not in node:
        return None
    setting = found.group(1)
    raw = OmegaConf.to_container(node, resolve=False)[setting]
    source = re.fullmatch(r"\$\{(\.*)([\w.]+)\}", raw) if isinstance(raw, str) else None
    if source is None:
        full_key = f"{key}.{setting}"
    elif not source.group(1):  # an absolute interpolation
        full_key = source.group(2)
    else:
        parts = key.split(".")
        full_key = ".".join([*parts[: len(parts) - len(source.group(1)) + 1], source.group(2)])
    return re.sub(rf"\b{setting}\b", full_key, message)


def _get(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(f"{key} is required: add {key}=<value> to the command.") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {key} must be {allowed}.")


def _check_checkpoint(cfg: DictConfig) -> None:
    ckpt_path = _get(cfg, "ckpt_path")
    if ckpt_path is not None:
        _check(Path(ckpt_path).is_file(), "ckpt_path", ckpt_path, "an existing checkpoint file")


def validate_eval_config(cfg: DictConfig) -> None:
    """Like ``validate_config``, for ``vae_lightning.evaluate``."""
    _check_checkpoint(cfg)
    network = _get(cfg, "eval.fid.network")
    check_network(network)
    n = _get(cfg, "eval.fid.num_samples")
    _check(_is_int(n) and n >= 2, "eval.fid.num_samples", n, "an integer >= 2")
    batch = _get(cfg, "eval.fid.batch_size")
    allowed = "null or an integer >= 2"
    _check(batch is None or (_is_int(batch) and batch >= 2), "eval.fid.batch_size", batch, allowed)
    for key in ("eval.num_samples", "eval.max_batch", "eval.grid_points", "data.batch_size"):
        value = _get(cfg, key)
        _check(_is_int(value) and value >= 1, key, value, "an integer >= 1")
    limit = _get(cfg, "eval.limit")
    _check(limit is None or (_is_int(limit) and limit >= 2), "eval.limit", limit, "null or >= 2")
    for key in ("eval.grid_limit", "eval.active_threshold"):
        value = _get(cfg, key)
        _check(_is_real(value) and value > 0, key, value, "a number > 0")
    for key in ("data.dequantize", "data.download", "eval.prior_sampling", "eval.fid.enabled"):
        value = _get(cfg, key)
        _check(isinstance(value, bool), key, value, "true or false")
    accelerator = _get(cfg, "trainer.accelerator")
    allowed = ("auto", "cpu", "gpu", "cuda")
    _check(accelerator in allowed, "trainer.accelerator", accelerator, "auto, cpu or gpu")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator=gpu, but no GPU is visible: use auto or cpu.")
    _check_wandb(cfg)


def validate_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` for the first setting that is out of range or of the wrong type."""
    for key in ("model.latent_dim", "data.batch_size"):
        value = _get(cfg, key)
        _check(_is_int(value) and value >= 1, key, value, "an integer >= 1")
    lr = _get(cfg, "model.optimizer.lr")
    _check(_is_real(lr) and lr > 0, "model.optimizer.lr", lr, "a number > 0")
    beta = _get(cfg, "model.beta")
    _check(_is_real(beta) and beta >= 0, "model.beta", beta, "a number >= 0")
    free_bits = _get(cfg, "model.free_bits")
    _check(_is_real(free_bits) and free_bits >= 0, "model.free_bits", free_bits, "a number >= 0")
    kind = _get(cfg, "model.kl_schedule.kind")
    check_settings(cfg, "model.kl_schedule", KLSchedule)
    if (
        kind == "cyclical"
        and _get(cfg, "trainer.max_epochs") == -1
        and _get(cfg, "trainer.max_steps") == -1
    ):
        raise ConfigError(
            "model.kl_schedule.kind=cyclical needs a run of known length: set trainer.max_epochs "
            "or trainer.max_steps."
        )
    if OmegaConf.select(cfg, "callbacks.update_guards") is not None:
        build(cfg, "callbacks.update_guards")  # the guards check their own settings
    build(cfg, "model.likelihood")  # the head checks its own settings
    _check_model_keys(cfg)
    _check_scheduler(cfg)
    _check_objective(cfg)
    workers = _get(cfg, "data.num_workers")
    _check(_is_int(workers) and workers >= 0, "data.num_workers", workers, "an integer >= 0")
    fraction = _get(cfg, "data.val_fraction")
    _check(
        _is_real(fraction) and 0 < fraction < 1, "data.val_fraction", fraction, "between 0 and 1"
    )
    for key in ("model.compile", "data.random_flip", "data.dequantize", "data.download", "test"):
        value = _get(cfg, key)
        _check(isinstance(value, bool), key, value, "true or false")
    on_device = _get(cfg, "data.on_device")
    _check(on_device in ("auto", True, False), "data.on_device", on_device, "auto, true or false")
    epochs = _get(cfg, "trainer.max_epochs")
    _check(
        epochs is None or (_is_int(epochs) and (epochs >= 1 or epochs == -1)),
        "trainer.max_epochs",
        epochs,
        "an integer >= 1, or -1 for no limit",
    )
    _check(_is_int(_get(cfg, "seed")), "seed", _get(cfg, "seed"), "an integer")
    for key in ("paths.data_dir", "paths.output_root", "data.data_dir"):
        value = _get(cfg, key)
        _check(isinstance(value, str) and value != "", key, value, "a folder path")
    tags = _get(cfg, "tags")
    _check(
        OmegaConf.is_list(tags) and all(isinstance(t, str) for t in tags),
        "tags",
        tags,
        "a list of names, e.g. tags=[baseline,h64]",
    )
    _check_wandb(cfg)
    _check_checkpoint(cfg)


def _check_model_keys(cfg: DictConfig) -> None:
    """When the model's ``_target_`` takes ``**kwargs`` (``VAELitModule`` takes the settings a
    likelihood file puts beside its head), each of its other keys must be one that the model's
    config reads by interpolation (``model.sigma``): an added key that nothing reads
    (``+model.sigma=0.3`` beside the logistic mixture) would be ignored, while the run's name
    shows it as if it had counted."""
    model = OmegaConf.to_container(cfg.model, resolve=False)
    try:
        parameters = inspect.signature(get_class(model["_target_"])).parameters
    except Exception:
        return  # building the model names what is wrong with its target
    named = {n for n, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    if len(named) == len(parameters):
        return  # the constructor refuses an unknown key itself
    read = set(re.findall(r"\$\{(?:model\.|\.+)(\w+)", json.dumps(model)))
    for key, value in model.items():
        if key not in {"_target_", "defaults", *named, *read}:
            settings = ", ".join(f"model.{name}" for name in sorted(named | read))
            raise ConfigError(
                f"model.{key}={value!r} is not allowed: nothing reads model.{key}. "
                f"The model's settings are {settings}."
            )


def _check_scheduler(cfg: DictConfig) -> None:
    """``model.scheduler`` builds on an optimizer, and a cosine decay has a length."""
    if OmegaConf.select(cfg, "model.scheduler") is None:
        return
    t_max = OmegaConf.select(cfg, "model.scheduler.T_max")
    if "T_max" in cfg.model.scheduler and not (_is_int(t_max) and t_max >= 1):
        raise ConfigError(
            f"model.scheduler.T_max={t_max!r} is not allowed: the cosine decay needs its length "
            "in epochs, an integer >= 1 (it is trainer.max_epochs unless set)."
        )
    make = build(cfg, "model.scheduler")
    try:
        make(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"model.scheduler was refused by {cfg.model.scheduler.get('_target_', '?')}: "
            f"{first_line(err)}. Fix the model.scheduler.* settings."
        ) from None


def _check_objective(cfg: DictConfig) -> None:
    objective = _get(cfg, "model.objective")
    _check(objective in ("elbo", "iwae"), "model.objective", objective, "elbo or iwae")
    if objective != "iwae":
        return
    samples = _get(cfg, "model.iwae_samples")
    _check(_is_int(samples) and samples >= 1, "model.iwae_samples", samples, "an integer >= 1")
    conflicts = {
        "model.beta": _get(cfg, "model.beta") != 1,
        "model.kl_schedule.kind": _get(cfg, "model.kl_schedule.kind") != "constant",
        "model.free_bits": _get(cfg, "model.free_bits") != 0,
        "model.sigma_mode": _get(cfg, "model.sigma_mode") == "optimal",
    }
    if bad := [key for key, conflict in conflicts.items() if conflict]:
        raise ConfigError(
            f"model.objective=iwae trains on the IWAE bound of the model itself, so it takes no "
            f"{', '.join(bad)} (set to {', '.join(str(_get(cfg, k)) for k in bad)}): use "
            "model.beta=1, model.kl_schedule.kind=constant, model.free_bits=0 and a sigma_mode "
            "other than optimal, or model.objective=elbo."
        )


def _check_wandb(cfg: DictConfig) -> None:
    if OmegaConf.select(cfg, "logger.wandb") is not None:
        check_wandb_settings(
            _get(cfg, "logger.wandb.mode"),
            OmegaConf.select(cfg, "logger.wandb.log_model", default=False),
        )


RESUMABLE_CHANGES = (
    "optimizer.",
    "objective",
    "iwae_samples",
    "beta",
    "kl_schedule.",
    "free_bits",
    "compile",
    "arch.channels_last",
)
"""Model settings a resumed run may change: optimizer settings other than its class (the new
values are applied to the restored optimizer), the training objective, the KL weight and its
schedule, free bits, the update-skipping threshold, compilation, what a non-finite loss does,
and the memory layout.
Every other setting shapes the parameters or what they mean."""


def _flat_model_settings(model: dict[str, Any]) -> dict[str, Any]:
    """The model's settings that a resumed run must share with its checkpoint, as dotted keys."""
    flat = flatten({k: v for k, v in model.items() if k not in ("_target_", "defaults")})
    return {
        key: value
        for key, value in flat.items()
        if key == "optimizer._target_" or not key.startswith(RESUMABLE_CHANGES)
    }


def check_resume_checkpoint(cfg: DictConfig) -> str | None:
    """Refuse a ``ckpt_path`` that ``read_checkpoint`` refuses, or whose model differs from
    ``cfg.model``; return the W&B run id stored in it, if any."""
    path = _get(cfg, "ckpt_path")
    if path is None:
        return None
    checkpoint = read_checkpoint(path)
    saved = checkpoint["hyper_parameters"]
    wanted = _flat_model_settings(OmegaConf.to_container(cfg.model, resolve=True))
    found = _flat_model_settings(current_settings(saved))
    differ = sorted(
        key for key in wanted.keys() | found.keys() if wanted.get(key) != found.get(key)
    )
    if differ:
        unset = "(not set)"
        details = "; ".join(
            f"model.{k}: checkpoint {found.get(k, unset)}, this run {wanted.get(k, unset)}"
            for k in differ
        )
        raise ConfigError(
            f"ckpt_path={path} holds a different model ({details}). Resume with the model "
            "settings of the run that wrote it, or drop ckpt_path to start afresh."
        )
    return checkpoint.get("wandb_run_id")
