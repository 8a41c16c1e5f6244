"""The files a run leaves in its folder: the resolved config, the final metrics, and the
checkpoint a requeued or re-run job resumes from."""

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


class RunFilesNotFoundError(FileNotFoundError):
    """A folder holds none of the run files a command reads; the message names it."""


def last_checkpoint(output_dir: str | Path) -> str | None:
    """``<output_dir>/checkpoints/last.ckpt`` if it exists: a requeued or re-run job resumes
    from it."""
    path = Path(output_dir) / "checkpoints" / "last.ckpt"
    return str(path) if path.is_file() else None


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
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
    return path


def save_final_metrics(metrics: dict[str, float], output_dir: str | Path) -> Path:
    """``metrics.json``: the last train step's, last validation's and the test's metrics."""
    path = Path(output_dir) / "metrics.json"
    path.write_text(json.dumps(dict(sorted(metrics.items())), indent=2))
    return path
