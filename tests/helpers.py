"""What the tests share: a tiny CIFAR-10 in the official pickle layout, running the commands as
a user does, reading what a run leaves on disk, and small model configs."""

import csv
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from vae_lightning.cli import CONFIG_DIR
from vae_lightning.data.cifar10 import BASE_FOLDER, TEST_FILES, TRAIN_FILES
from vae_lightning.training.checkpoint_format import LIKELIHOOD_KINDS
from vae_lightning.training.lit_module import VAELitModule

ROOT = Path(__file__).resolve().parents[1]
"""The project's folder: on PYTHONPATH in commands the tests run, for their test callbacks."""
REAL_DATA = ROOT.parent / "shared" / "data"


def structured_images(rng: np.random.Generator, count: int, patterns: np.ndarray) -> np.ndarray:
    """8-bit images with a few latent factors: a sigmoid of a random combination of the smooth
    ``patterns`` (4, 3, 32, 32), plus noise; a VAE learns them in a few hundred steps."""
    factors = rng.normal(size=(count, 4))
    logits = np.tensordot(factors, patterns, axes=1) + rng.normal(
        scale=0.1, size=(count, 3, 32, 32)
    )
    return np.round(255 / (1 + np.exp(-logits))).astype(np.uint8).reshape(count, 3072)


def write_cifar10(
    root: Path, images_per_file: int = 16, seed: int = 0, structured: bool = False
) -> Path:
    """Write data_batch_1..5, test_batch and batches.meta with random images (uniform noise, or
    ``structured_images``); return root."""
    rng = np.random.default_rng(seed)
    if structured:  # 4x4-pixel blocks
        patterns = np.kron(rng.normal(size=(4, 3, 8, 8)), np.ones((4, 4)))
    folder = root / BASE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_FILES + TEST_FILES:
        data = (
            structured_images(rng, images_per_file, patterns)
            if structured
            else rng.integers(0, 256, (images_per_file, 3072), dtype=np.uint8)
        )
        entry = {
            "batch_label": name,
            "data": data,
            "labels": rng.integers(0, 10, images_per_file).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class_{i}" for i in range(10)]}, f)
    return root


class LeavesMarker:
    """Unpickling it opens ``path`` for writing: the file's existence shows that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def cli_env(home: Path) -> dict[str, str]:
    """The environment of a new user without a W&B account, and no network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("NETRC", None)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # as the test process: one thread per process
        env["OMP_NUM_THREADS"] = "1"
    return env


def run_train(args: list[str], cwd: Path, expect_ok: bool = True) -> subprocess.CompletedProcess:
    return run_module("vae_lightning.train", args, cwd, expect_ok)


def run_module(
    module: str,
    args: list[str],
    cwd: Path,
    expect_ok: bool = True,
    timeout: int = 300,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m MODULE ARGS`` in ``cwd``; fail with its output if it fails."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=cli_env(cwd) | (extra_env or {}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def start_train(
    args: list[str], cwd: Path, extra_env: dict[str, str] | None = None, stdout=subprocess.PIPE
) -> subprocess.Popen:
    """Start ``python -m vae_lightning.train ARGS`` in ``cwd`` without waiting; its stdout and
    stderr come together as text on ``stdout`` (a pipe, or an open file)."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "vae_lightning.train", *args],
        cwd=cwd,
        env=cli_env(cwd) | (extra_env or {}),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_files(
    proc: subprocess.Popen, folder: Path, pattern: str, count: int = 1, timeout: float = 120
) -> list[Path]:
    """Wait until ``count`` files match ``pattern`` under ``folder`` while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while len(found := list(folder.glob(pattern))) < count:
        assert time.monotonic() < deadline and proc.poll() is None, "the run ended or stalled"
        time.sleep(0.2)
    return found


SHORT = [
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "data.num_workers=0",
    "data.batch_size=16",
]
SPLITS_AND_METRICS = [
    f"{split}/{name}"
    for split in ("train", "val", "test")
    for name in ("loss", "recon_mse", "kl", "elbo", "bpd")
]


def single_run(cwd: Path) -> Path:
    runs = sorted((cwd / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 1, runs
    return runs[0]


def sweep_jobs(cwd: Path) -> list[Path]:
    sweeps = list((cwd / "outputs" / "multiruns").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    return sorted(p for p in sweeps[0].iterdir() if p.is_dir() and not p.name.startswith("."))


def assert_one_folder_per_job(cwd: Path, key: str, values: list[str]) -> list[Path]:
    """The sweep in ``cwd`` ran one job per value of ``key``, each a finished run folder of
    the sweep's W&B group, and no single run."""
    jobs = sweep_jobs(cwd)
    assert [p.name for p in jobs] == [str(i) for i in range(len(values))]
    for job, value in zip(jobs, values, strict=True):
        assert_run_folder(job)
        assert f"{key}={value}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert resolved(job)["run_group"].startswith("sweep_")
        assert last_value(metrics_csv(job), "test/bpd") > 0
    assert not (cwd / "outputs" / "runs").exists()
    return jobs


def metrics_csv(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def last_value(rows: list[dict[str, str]], key: str) -> float:
    return float([r[key] for r in rows if r.get(key)][-1])


def resolved(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def assert_run_folder(run: Path) -> None:
    assert (run / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("epoch*-bpd*.ckpt"))) == 1
    for name in ("reconstructions", "samples"):
        assert list((run / "images").glob(f"{name}_epoch=*.png")), name


def _items(items) -> dict[str, Any]:
    """W&B's key-value records as a dict (nested keys as nested dicts)."""
    found: dict[str, Any] = {}
    for item in items:
        *parents, name = item.nested_key or [item.key]
        tree = found
        for parent in parents:
            tree = tree.setdefault(parent, {})
        tree[name] = json.loads(item.value_json)
    return found


def offline_wandb_run(folder: Path) -> dict[str, Any]:
    """What an offline W&B run recorded, read back from its ``run-<id>.wandb`` file (LevelDB's
    log format: 32 KiB blocks of records with a 7-byte header, after W&B's 7-byte file header;
    each record a protobuf ``Record``): ``run`` (its ``Run`` record), ``config`` and ``summary``
    (the last value of each key), ``history`` (one dict per logged step), ``summaries`` (the
    summary each ``define_metric`` asked for) and ``artifacts`` (their names)."""
    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = folder.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    found: dict[str, Any] = {"config": {}, "summary": {}, "history": []}
    found |= {"summaries": {}, "artifacts": []}
    position, pieces = 7, b""
    while position + 7 <= len(data):
        if (left := 32768 - position % 32768) < 7:
            position += left
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        pieces += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind not in (1, 4):  # a record's first or middle piece
            continue
        record = Record.FromString(pieces)
        pieces = b""
        what = record.WhichOneof("record_type")
        if what == "run":
            found["run"] = record.run
            found["config"] |= _items(record.run.config.update)
        elif what == "config":
            found["config"] |= _items(record.config.update)
        elif what == "summary":
            found["summary"] |= _items(record.summary.update)
        elif what == "history":
            found["history"].append(_items(record.history.item))
        elif what == "metric" and record.metric.HasField("summary"):
            summary = record.metric.summary
            found["summaries"][record.metric.name] = [
                name for name in ("min", "max", "last") if getattr(summary, name)
            ]
        elif what == "artifact":
            found["artifacts"].append(record.artifact.name)
    return found


DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
"""Two CPU processes (gloo)."""

MLP = {
    "encoder": {"_target_": "vae_lightning.core.architectures.MLPEncoder", "hidden_dims": [64]},
    "decoder": {"_target_": "vae_lightning.core.architectures.MLPDecoder", "hidden_dims": [64]},
}
ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}


def head_config(
    kind: str = "gaussian", sigma: float = 0.1, sigma_mode: str = "fixed", num_mixtures: int = 2
) -> dict[str, Any]:
    """A likelihood head's config, as conf/model/likelihood/<kind>.yaml resolves it."""
    settings = (
        {"num_mixtures": num_mixtures}
        if kind == "logistic_mixture"
        else {"sigma": sigma, "sigma_mode": sigma_mode}
    )
    return {"_target_": LIKELIHOOD_KINDS[kind], **settings}


def make_module(
    sigma: float = 0.1, sigma_mode: str = "fixed", kind: str = "gaussian", **settings: Any
) -> VAELitModule:
    """A small MLP VAE in float64, seeded, with the ``kind`` head."""
    torch.manual_seed(0)
    head = head_config(kind, sigma, sigma_mode)
    return VAELitModule(
        arch=MLP, optimizer=ADAM, latent_dim=4, likelihood=head, **settings
    ).double()


def composed(*overrides: str, hydra: bool = False, config: str = "train"):
    """The ``config`` (train or eval) as Hydra composes it for these overrides."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config, overrides=list(overrides), return_hydra_config=hydra)


class NonFiniteBatchAt(L.Callback):
    """Test callback, added from the command line: make rank ``rank``'s batch NaN at global
    step ``step``, so that its loss is NaN (the other ranks' stays finite). After that step it
    writes ``nonfinite_rank<r>.json`` to the working directory: whether the step changed the
    module's state (weights and buffers such as sigma) and the optimizer's state."""

    def __init__(self, step: int, rank: int = 0) -> None:
        if step < 0:
            raise ValueError(f"step={step}: it must be an integer >= 0")
        self.step, self.rank = step, rank
        self._before: tuple[dict, dict] | None = None

    @staticmethod
    def _state(trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[dict, dict]:
        weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        optimizer = {
            (i, k): v.clone() if torch.is_tensor(v) else v
            for i, state in enumerate(trainer.optimizers[0].state.values())
            for k, v in state.items()
        }
        return weights, optimizer

    @staticmethod
    def _same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(
            torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self._before = self._state(trainer, pl_module)
            if trainer.global_rank == self.rank:
                batch[0].fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._before is None:
            return
        after = self._state(trainer, pl_module)
        report = {
            "weights_unchanged": self._same(self._before[0], after[0]),
            "optimizer_unchanged": self._same(self._before[1], after[1]),
            "all_finite": all(torch.isfinite(v).all().item() for v in after[0].values()),
        }
        Path(f"nonfinite_rank{trainer.global_rank}.json").write_text(json.dumps(report))
        self._before = None


def callback_overrides(key: str, callback: type[L.Callback], **settings: Any) -> list[str]:
    """The overrides that add a test module's ``callback`` to a run as ``callbacks.<key>``."""
    target = f"+callbacks.{key}._target_={callback.__module__}.{callback.__qualname__}"
    return [target, *(f"+callbacks.{key}.{name}={value}" for name, value in settings.items())]


def nonfinite_batch_at(step: int, rank: int = 0) -> list[str]:
    """The overrides that add ``NonFiniteBatchAt`` to a run."""
    return callback_overrides("nonfinite", NonFiniteBatchAt, step=step, rank=rank)


class PerturbDecoderAt(L.Callback):
    """Test callback, added from the command line: after epoch ``epoch``'s validation, add
    noise of scale ``scale`` to every decoder weight, the same on every rank, so that the next
    validation's bpd rises far above the best while every value stays finite."""

    def __init__(self, epoch: int = 0, scale: float = 3.0) -> None:
        self.epoch, self.scale = epoch, scale

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.epoch or self.scale == 0:
            return
        noise = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in pl_module.vae.decoder.parameters():
                param.add_(self.scale * torch.randn(param.shape, generator=noise).to(param))


def perturb_decoder_at(epoch: int, scale: float = 3.0) -> list[str]:
    """The overrides that add ``PerturbDecoderAt`` to a run."""
    return callback_overrides("perturb", PerturbDecoderAt, epoch=epoch, scale=scale)


class WandbFailsAt(L.Callback):
    """Test callback, added from the command line: from global step ``step`` on, the W&B run's
    ``log`` raises wandb's ``CommError``, as when its service dies or the network breaks."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step or trainer.global_rank != 0:
            return
        from wandb.errors import CommError

        def broken(*args, **kwargs):
            raise CommError("network is unreachable")

        for logger in trainer.loggers:
            if type(logger).__name__ == "FallbackWandbLogger":
                logger.experiment.log = broken


def wandb_fails_at(step: int) -> list[str]:
    """The overrides that add ``WandbFailsAt`` to a run."""
    return callback_overrides("wandb_fails", WandbFailsAt, step=step)


class WandbStartTimesOut(L.Callback):
    """Test callback, added from the command line: the process's first ``wandb.init`` raises
    the error wandb raises when a run's start times out, as on a loaded machine."""

    def __init__(self) -> None:
        import wandb
        from wandb.errors import CommError

        started = wandb.init

        def times_out(*args, **kwargs):
            wandb.init = started
            raise CommError("Run initialization has timed out after 90.0 sec.")

        wandb.init = times_out


def wandb_start_times_out() -> list[str]:
    """The overrides that add ``WandbStartTimesOut`` to a run."""
    return callback_overrides("wandb_start", WandbStartTimesOut)


def descendants(pid: int) -> list[int]:
    """The ids of the processes below ``pid`` (its children, theirs, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def fit_in_process(
    module: L.LightningModule,
    cifar_dir: Path,
    checkpoint_dir: Path,
    batch_size: int,
    callbacks: Sequence[L.Callback] = (),
    ckpt_path: Path | None = None,
    **trainer,
) -> L.Trainer:
    """Fit ``module`` (resumed from ``ckpt_path`` if given) on the fixture data in this process,
    on the CPU, seeded, with ``callbacks`` (the default ``UpdateGuards`` unless they hold one)
    and ``last.ckpt`` in ``checkpoint_dir``; ``trainer`` holds the Trainer's other arguments
    (stopping, logger: none unless given). Quiet unless a callback is a progress bar."""
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

    from vae_lightning.data.cifar10 import CIFAR10DataModule
    from vae_lightning.training.update_guards import UpdateGuards

    if not any(isinstance(c, UpdateGuards) for c in callbacks):
        callbacks = [*callbacks, UpdateGuards()]

    L.seed_everything(0)
    fitter = L.Trainer(
        **{"logger": False, **trainer},
        accelerator="cpu",
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
        enable_model_summary=False,
        callbacks=[*callbacks, ModelCheckpoint(dirpath=checkpoint_dir, filename="last")],
    )
    data = CIFAR10DataModule(str(cifar_dir), batch_size=batch_size, num_workers=0, download=False)
    fitter.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return fitter


def assert_no_rank_changed_anything(folder: Path, world_size: int) -> None:
    """Every rank's ``NonFiniteBatchAt`` report: the step left weights, buffers and optimizer
    state as they were, and everything is finite."""
    reports = sorted(folder.glob("nonfinite_rank*.json"))
    assert len(reports) == world_size  # each rank saw the step
    for report in reports:
        assert json.loads(report.read_text()) == {
            "weights_unchanged": True,
            "optimizer_unchanged": True,
            "all_finite": True,
        }, report.name
