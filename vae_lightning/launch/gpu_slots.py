"""GPU slots for parallel sweep jobs on one machine: one GPU per one-GPU job."""

import fcntl
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, read_write

log = logging.getLogger(__name__)


@contextmanager
def claim_slot(lock_dir: str | Path, slots: int, poll_s: float = 1.0) -> Iterator[int]:
    """Hold the first free one of ``slots`` lock files in ``lock_dir`` (waiting while all are
    held) and yield its number. The lock is the operating system's (``flock``), so a job that
    dies frees its slot."""
    folder = Path(lock_dir)
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        for slot in range(slots):
            handle = open(folder / f"{slot}.lock", "w")  # noqa: SIM115 (held until released)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield slot
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        time.sleep(poll_s)


@contextmanager
def gpu_of_its_own(cfg: DictConfig) -> Iterator[None]:
    """Under ``hydra/launcher=joblib``, a one-GPU job gets a GPU that no other job of the sweep
    is using (``trainer.devices=[i]``); with more jobs than GPUs, the others wait for one."""
    launcher = OmegaConf.select(HydraConfig.get(), "launcher._target_", default="") or ""
    wanted = cfg.trainer.accelerator in ("gpu", "cuda", "auto") and cfg.trainer.devices == 1
    gpus = torch.cuda.device_count() if launcher.endswith("JoblibLauncher") and wanted else 0
    if not gpus:
        yield
        return
    with claim_slot(Path(HydraConfig.get().sweep.dir) / ".gpu_locks", gpus) as gpu:
        log.info(f"Job {HydraConfig.get().job.num} runs on GPU {gpu}")
        with read_write(cfg.trainer):
            cfg.trainer.accelerator, cfg.trainer.devices = "gpu", [gpu]
        yield
