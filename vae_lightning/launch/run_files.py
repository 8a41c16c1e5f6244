"""The files a run leaves in its folder: the resolved config, the final metrics, the hardware
it ran on, and the checkpoint a requeued or re-run job resumes from."""

import json
import platform
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vae_lightning.errors import UserError
from vae_lightning.files import write_text_atomically


class RunFilesNotFoundError(UserError, FileNotFoundError):
    """A folder holds none of the run files a command reads; the message names it."""


NOT_RESULT_SETTINGS = ("data.data_dir", "paths.", "logger", "hydra.", "ckpt_path", "test")
"""Overrides that change no result (where the data is, where outputs go, the loggers, the
checkpoint a run resumed from, whether it tested at its end): left out where runs are named or
compared."""


def last_checkpoint(output_dir: str | Path) -> str | None:
    """``<output_dir>/checkpoints/last.ckpt`` if it exists: a requeued or re-run job resumes
    from it."""
    path = Path(output_dir) / "checkpoints" / "last.ckpt"
    return str(path) if path.is_file() else None


def threads(count: int) -> str:
    """``"1 thread"``, ``"2 threads"``."""
    return f"{count} thread{'s' if count != 1 else ''}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"sigma": 0.1}}`` -> ``{"model.sigma": 0.1}``, for loggers' config tables."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def save_resolved_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    path = Path(output_dir) / "config.yaml"
    write_text_atomically(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def save_final_metrics(metrics: dict[str, float], output_dir: str | Path) -> Path:
    """``metrics.json``: the last train step's, last validation's and the test's metrics."""
    path = Path(output_dir) / "metrics.json"
    write_text_atomically(path, json.dumps(dict(sorted(metrics.items())), indent=2))
    return path


def save_hardware(trainer: Any, output_dir: str | Path) -> Path:
    """``hardware.json``: the devices the run trained on (processes, accelerator, device name,
    CPU threads, precision), so that its wall time can be read."""
    cuda = trainer.strategy.root_device.type == "cuda"
    device = torch.cuda.get_device_name(trainer.strategy.root_device) if cuda else "CPU"
    info = {
        "device": device,
        "processes": trainer.world_size,
        "cpu": f"{platform.machine()}, {threads(torch.get_num_threads())}",
        "precision": str(trainer.precision),
        "torch": torch.__version__,
    }
    path = Path(output_dir) / "hardware.json"
    write_text_atomically(path, json.dumps(info, indent=2))
    return path
