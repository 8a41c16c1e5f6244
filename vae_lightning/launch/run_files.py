"""The files a run leaves in its folder: the resolved config, the final metrics, the hardware
it ran on, and the checkpoint a requeued or re-run job resumes from."""

import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf


class RunFilesNotFoundError(FileNotFoundError):
    """A folder holds none of the run files a command reads; the message names it."""


class RunFileDamagedError(ValueError):
    """A run file cannot be read as what it should hold; the message names it and why."""


def _has_key(tree: Any, dotted_key: str) -> bool:
    for part in dotted_key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def read_run_file(path: Path, expected: type = dict, required: Sequence[str] = ()) -> Any:
    """The YAML or JSON file ``path``, which must hold a ``expected`` (a dict or a list) and,
    for a dict, each dotted key of ``required``; else ``RunFileDamagedError`` naming the file."""
    damaged = f"{path} is damaged"
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:  # JSON and Unicode errors are ValueErrors
        reason = str(err).splitlines()[0]
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise RunFileDamagedError(f"{damaged}: it is not {kind} ({reason})") from None
    if not isinstance(data, expected):
        shape = "a mapping" if expected is dict else "a list"
        raise RunFileDamagedError(f"{damaged}: it holds {type(data).__name__}, not {shape}")
    missing = [key for key in required if not _has_key(data, key)]
    if missing:
        raise RunFileDamagedError(f"{damaged}: it lacks {', '.join(missing)}")
    return data


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
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)
    return path


def save_final_metrics(metrics: dict[str, float], output_dir: str | Path) -> Path:
    """``metrics.json``: the last train step's, last validation's and the test's metrics."""
    path = Path(output_dir) / "metrics.json"
    path.write_text(json.dumps(dict(sorted(metrics.items())), indent=2))
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
    path.write_text(json.dumps(info, indent=2))
    return path
