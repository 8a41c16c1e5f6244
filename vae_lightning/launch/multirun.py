"""Where a Hydra job runs: a single run or one job of a multirun (sweep)."""

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_group() -> str | None:
    """A name shared by the jobs of one multirun (its folder's date and time), else None."""
    if not is_multirun():
        return None
    return "sweep_" + "_".join(Path(HydraConfig.get().sweep.dir).parts[-2:])
