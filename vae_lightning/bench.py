"""Training throughput: ``python -m vae_lightning.bench [--archs conv] [--target-bpd 6.5]``.

For each architecture, trains with the device-resident data path and with the DataLoader path
(at the default config's ``num_workers``) through Lightning's Trainer, and reports images/s after
warm-up, the implied time per 45k-image epoch, and the share of each step spent waiting for data.
"""

import argparse
import logging
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import EarlyStopping

from vae_lightning.cli import CONFIG_DIR, one_line_errors, quiet_third_party_warnings
from vae_lightning.config import build
from vae_lightning.launch.run_files import threads


class StepTimer(L.Callback):
    """Per step after ``warmup`` steps: data time (previous step's end to this step's start:
    fetching, transfer and scaling) and compute time (forward, backward, optimizer)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.data = self.compute = 0.0
        self.images = 0
        self._last_end = self._start = 0.0

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = self._now(trainer)
        if trainer.global_step >= self.warmup:
            self.data += self._start - self._last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last_end = self._now(trainer)
        if trainer.global_step > self.warmup:  # global_step counts this step already
            self.compute += self._last_end - self._start
            self.images += len(batch[0])


def _config(args: argparse.Namespace, arch: str, on_device: bool):
    overrides = [
        f"model/arch={arch}",
        f"data.data_dir={args.data_dir}",
        f"data.batch_size={args.batch_size}",
        f"data.on_device={on_device}",
        f"trainer.precision={args.precision}",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def _trainer(args: argparse.Namespace, callbacks: list[L.Callback], **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="auto",
        devices=1,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def throughput(args: argparse.Namespace, arch: str, on_device: bool) -> dict[str, float]:
    cfg = _config(args, arch, on_device)
    L.seed_everything(0, verbose=False)
    datamodule = build(cfg, "data")
    model = build(cfg, "model", _recursive_=False)
    timer = StepTimer(args.warmup)
    trainer = _trainer(
        args, [timer], max_steps=args.warmup + args.steps, limit_val_batches=0, max_epochs=-1
    )
    trainer.fit(model, datamodule=datamodule)
    step_time = timer.data + timer.compute
    images_per_s = timer.images / step_time
    return {
        "images_per_s": images_per_s,
        "epoch_s": len(datamodule.train_set) / images_per_s,
        "data_share": timer.data / step_time,
        "num_workers": 0 if on_device else cfg.data.num_workers,
    }


def time_to_bpd(args: argparse.Namespace, arch: str) -> tuple[float, float, int]:
    """Wall time of fit until val/bpd <= target (validating every ``--val-every`` steps)."""
    cfg = _config(args, arch, on_device=True)
    L.seed_everything(0, verbose=False)
    datamodule = build(cfg, "data")
    model = build(cfg, "model", _recursive_=False)
    datamodule.setup("fit")
    steps_per_epoch = math.ceil(len(datamodule.train_set) / args.batch_size)
    stop = EarlyStopping("val/bpd", stopping_threshold=args.target_bpd, patience=10**9)
    interval = min(args.val_every, steps_per_epoch)
    trainer = _trainer(args, [stop], max_epochs=args.max_epochs, val_check_interval=interval)
    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - started
    return seconds, float(trainer.callback_metrics["val/bpd"]), trainer.global_step


def startup_seconds(args: argparse.Namespace) -> float:
    """Wall time of ``python -m vae_lightning.train`` doing one training step and nothing else:
    an upper bound on the time from the command to the first step."""
    command = [
        sys.executable,
        "-m",
        "vae_lightning.train",
        f"data.data_dir={args.data_dir}",
        "logger=none",
        "~callbacks",
        "trainer.max_steps=1",
        "trainer.limit_val_batches=0",
        "test=false",
        f"paths.output_root={args.output_root}",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


def describe_device() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"CPU: {platform.processor() or platform.machine()}, {threads(torch.get_num_threads())}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vae_lightning.bench", description=__doc__)
    parser.add_argument("--archs", default="mlp,conv,resnet")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing starts")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--paths", default="device,dataloader", help="data paths to compare")
    parser.add_argument("--target-bpd", type=float, default=None)
    parser.add_argument("--val-every", type=int, default=100, help="steps, with --target-bpd")
    parser.add_argument("--max-epochs", type=int, default=10, help="with --target-bpd")
    parser.add_argument("--startup", action="store_true", help="also time start-up to step 1")
    parser.add_argument("--output-root", default=str(Path("outputs") / "bench"))
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    quiet_third_party_warnings()
    with one_line_errors():
        print("\n".join(measure(args)))


def measure(args: argparse.Namespace) -> list[str]:
    """The report's lines: the setup, then one line per measurement."""

    lines = [
        f"device: {describe_device()}",
        f"python {platform.python_version()}, torch {torch.__version__}, lightning {L.__version__}",
        f"settings: batch {args.batch_size}, precision {args.precision}, "
        f"{args.warmup} warm-up + {args.steps} timed steps",
        f"{'arch':8} {'data path':24} {'images/s':>10} {'s/epoch':>9} {'data share':>11}",
    ]
    paths = [p.strip() for p in args.paths.split(",")]
    for arch in args.archs.split(","):
        results = {}
        for path in paths:
            r = throughput(args, arch, on_device=path == "device")
            results[path] = r
            label = path if path == "device" else f"dataloader ({r['num_workers']} workers)"
            lines.append(
                f"{arch:8} {label:24} {r['images_per_s']:10.0f} {r['epoch_s']:9.1f} "
                f"{100 * r['data_share']:10.1f}%"
            )
        if len(results) == 2:
            ratio = results["device"]["images_per_s"] / results["dataloader"]["images_per_s"]
            lines.append(f"{arch:8} device / dataloader throughput: {ratio:.2f}x")
        if args.target_bpd is not None:
            seconds, bpd, steps = time_to_bpd(args, arch)
            reached = "reached" if bpd <= args.target_bpd else "NOT reached"
            lines.append(
                f"{arch:8} val/bpd <= {args.target_bpd}: {reached} after {seconds:.1f} s "
                f"({steps} steps, val/bpd {bpd:.4f})"
            )
    if args.startup:
        seconds = startup_seconds(args)
        lines.append(f"start-up to first training step (whole command): {seconds:.1f} s")
    return lines


if __name__ == "__main__":
    main()
