"""Checkpoint files: written whole (a full disk or a kill never leaves a partial file under a
checkpoint's name), and read from anywhere as weights only (unpickling one never runs code),
checked before any work, so that a damaged or foreign file costs one line, not an hour."""

import os
import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vae_lightning.errors import UserError, first_line
from vae_lightning.files import torch_save_atomically
from vae_lightning.training.checkpoint_format import current_settings
from vae_lightning.training.lit_module import VAELitModule

MODEL_SETTINGS = ("arch", "optimizer", "latent_dim")
"""Settings every ``VAELitModule`` checkpoint holds under ``hyper_parameters``."""

TRUSTED_TARGETS = ("vae_lightning.", "torch.nn.", "torch.optim.")
"""The modules a checkpoint's ``_target_`` settings may always name: building the model imports
and calls them, so a name from elsewhere could run any code."""

TRUSTED_MODULES_VARIABLE = "VAE_LIGHTNING_TRUSTED_MODULES"
"""Names the user's own modules (comma-separated) that checkpoints may name besides."""


def trusted_targets() -> tuple[str, ...]:
    """``TRUSTED_TARGETS`` and the modules named in ``VAE_LIGHTNING_TRUSTED_MODULES``."""
    own = os.environ.get(TRUSTED_MODULES_VARIABLE, "").split(",")
    return TRUSTED_TARGETS + tuple(f"{name.strip()}." for name in own if name.strip())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, except that a checkpoint goes to a temporary file beside
    its final name, fsynced, then renamed: Lightning's own writer stages it on another file
    system and copies it over when the run folder is elsewhere (a cluster's scratch disk), which
    leaves a partial checkpoint when the disk fills. A full disk raises ``DiskFullError``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        torch_save_atomically(checkpoint, Path(path))


class CheckpointError(UserError, ValueError):
    """A checkpoint file cannot be used; the message names the file and what is wrong."""


def _damage(path: Path) -> str:
    """Why ``torch.load`` could not read ``path`` as an archive."""
    if path.stat().st_size == 0:
        return "is empty"
    if zipfile.is_zipfile(path):
        return "is a damaged torch archive"
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            return "is truncated (an incomplete copy or download?)"
    return "is not a torch checkpoint file"


def read_checkpoint(path: str | Path, setting: str = "ckpt_path", mmap: bool = False) -> dict:
    """The vae_lightning checkpoint at ``path``, loaded with ``weights_only=True`` whatever
    torch's default or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` say; ``CheckpointError`` (naming
    ``setting=path``) for a file that is missing, damaged, unsafe, or not one of this project's
    checkpoints."""
    path = Path(path)
    where = f"{setting}={path}"
    if not path.is_file():
        raise CheckpointError(f"{where}: there is no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except PermissionError:
        raise
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) and zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{where} holds Python objects other than tensors and plain settings, so it was "
                "not loaded (loading it could run code): pass a .ckpt written by "
                "vae_lightning.train"
            ) from None
        raise CheckpointError(f"{where} {_damage(path)}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(
            f"{where} is not a Lightning checkpoint (it holds no state_dict): pass a .ckpt "
            "written by vae_lightning.train"
        )
    settings = checkpoint.get("hyper_parameters")
    if not isinstance(settings, dict) or not all(key in settings for key in MODEL_SETTINGS):
        raise CheckpointError(
            f"{where} is a checkpoint of another project (its hyper_parameters are not a "
            "vae_lightning model's): pass a .ckpt written by vae_lightning.train"
        )
    return checkpoint


def _targets(tree: Any) -> Iterator[str]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "_target_":
                yield str(value)
            else:
                yield from _targets(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _targets(value)


def load_model(path: str | Path, setting: str = "ckpt_path") -> VAELitModule:
    """The model of the checkpoint at ``path`` with its weights, on the CPU; ``CheckpointError``
    for any checkpoint ``read_checkpoint`` refuses, one naming a class outside
    ``TRUSTED_TARGETS``, and one whose weights do not fit the model its settings describe."""
    checkpoint = read_checkpoint(path, setting)
    where = f"{setting}={path}"
    settings = current_settings(checkpoint["hyper_parameters"])
    if foreign := sorted(t for t in _targets(settings) if not t.startswith(trusted_targets())):
        modules = ", ".join(t.rstrip(".") for t in trusted_targets())
        raise CheckpointError(
            f"{where} names {', '.join(foreign)} in its settings; a checkpoint may only name "
            f"classes of {modules}, so it was not built. A module of your own is trusted when "
            f"{TRUSTED_MODULES_VARIABLE} names it ({TRUSTED_MODULES_VARIABLE}="
            f"{foreign[0].split('.')[0]})"
        )
    try:
        model = VAELitModule(**settings)
    except Exception as err:
        raise CheckpointError(
            f"{where}: its model settings do not build a vae_lightning model ({first_line(err)})"
        ) from None
    model.on_load_checkpoint(checkpoint)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:300]
        raise CheckpointError(
            f"{where} holds weights of another model than its settings describe ({reason})"
        ) from None
    return model
