"""What older checkpoints hold, read as this version writes it: model settings since renamed or
moved, and the val/bpd scores that ``ModelCheckpoint`` recorded."""

import math
from typing import Any

LIKELIHOOD_KINDS = {
    "gaussian": "vae_lightning.core.likelihoods.GaussianLikelihood",
    "discretized_gaussian": "vae_lightning.core.likelihoods.DiscretizedGaussianLikelihood",
    "logistic_mixture": "vae_lightning.core.likelihoods.LogisticMixtureLikelihood",
}
"""The heads that checkpoints written before heads were chosen by ``_target_`` name by kind."""

FORMER_SETTINGS = ("nonfinite_loss", "skip_grad_norm")
"""Model settings of older checkpoints that are the update guards' now (``UpdateGuards``)."""


def current_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's model settings as this version writes them: without ``FORMER_SETTINGS``;
    a ``likelihood`` chosen by ``kind``, with ``sigma`` and ``sigma_mode`` among every model's
    settings, becomes the head's ``_target_`` config, the Gaussian's sigma settings kept
    beside it."""
    settings = {k: v for k, v in saved.items() if k not in FORMER_SETTINGS}
    likelihood = settings.get("likelihood") or {"kind": "gaussian"}
    kind = likelihood.get("kind", "gaussian")
    if "_target_" in likelihood or kind not in LIKELIHOOD_KINDS:
        return settings
    if kind == "logistic_mixture":
        settings.pop("sigma", None)
        settings.pop("sigma_mode", None)
        head = {"num_mixtures": likelihood.get("num_mixtures", 10)}
    else:
        head = {
            "sigma": settings.setdefault("sigma", 0.1),
            "sigma_mode": settings.setdefault("sigma_mode", "fixed"),
        }
    settings["likelihood"] = {"_target_": LIKELIHOOD_KINDS[kind], **head}
    return settings


def val_bpd_scores(checkpoint: dict[str, Any], key: str) -> list[float]:
    """``key`` (``best_model_score``, ``current_score``) of each ``ModelCheckpoint`` state in a
    loaded checkpoint that monitors val/bpd, where recorded."""
    scores = [
        state.get(key)
        for state in checkpoint.get("callbacks", {}).values()
        if isinstance(state, dict) and state.get("monitor") == "val/bpd"
    ]
    return [float(s) for s in scores if s is not None]


def checkpoint_best(checkpoint: dict[str, Any]) -> float:
    """The best val/bpd a checkpoint's ``ModelCheckpoint`` state recorded (checkpoints written
    before the module kept its own), else infinity."""
    return min(val_bpd_scores(checkpoint, "best_model_score"), default=math.inf)
