"""Training speed against its floor: ``python -m vae_lightning.bench [--archs conv] [--small]``.

Times the same network, loss, optimizer, batch size, precision and data path in five training
loops, in one process, round by round: a bare PyTorch loop (the floor), a minimal
LightningModule with that loss alone (the floor Lightning sets), the project's LightningModule
without callbacks or logger, with the train command's callbacks, and with its callbacks and
logger (what ``python -m vae_lightning.train`` runs). Each is reported as time per step,
images/s, and ratios to the first two. Windows are timed without waiting for the device inside
them: on a GPU, CUDA events, read after one synchronisation at the window's end.
"""

import argparse
import contextlib
import logging
import math
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import DictConfig
from torch import Tensor

from vae_lightning.cli import (
    CONFIG_DIR,
    argument_parser,
    one_line_errors,
    quiet_third_party_warnings,
)
from vae_lightning.config import build
from vae_lightning.data.cifar10 import CIFAR10DataModule
from vae_lightning.errors import ConfigError
from vae_lightning.launch.run_files import threads
from vae_lightning.training.lit_module import VAELitModule

LOOPS = {
    "bare": "bare PyTorch loop",
    "lightning": "minimal LightningModule",
    "module": "VAELitModule alone",
    "callbacks": "+ train callbacks",
    "command": "+ logger = train command",
}
"""The loops, each adding to the one before (the first two share only the network and loss)."""

BENCH_WARNINGS = (
    r"You passed in a `val_dataloader` but have no `validation_step`",
    r"`ModelCheckpoint\(monitor='val/bpd'\)` could not find the monitored key",
)
"""What Lightning says of loops that train without validating, as the bench's do."""

SMALL = {"archs": "mlp", "batch_size": 16, "threads": 1, "warmup": 50, "steps": 500}
"""``--small``: a model whose compute is negligible, so that each loop's own cost shows."""
SMALL_MODEL = ["model.latent_dim=8", "model.arch.encoder.hidden_dims=[32]"]
SMALL_MODEL += ["model.arch.decoder.hidden_dims=[32]"]


@dataclass
class StepTimes:
    """Marks at the start and end of the timed steps: ``perf_counter`` on a CPU, CUDA events
    on a GPU (read once, after one synchronisation, by ``result``)."""

    cuda: bool
    starts: list = field(default_factory=list)
    ends: list = field(default_factory=list)
    images: int = 0

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self.starts.append(self._mark())

    def end(self, images: int) -> None:
        self.ends.append(self._mark())
        self.images += images

    def _seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a

    def result(self) -> dict[str, float]:
        """Seconds per step over the window (first start to last end), images/s, and the
        share of the window outside the steps (fetching data, and the loop's bookkeeping)."""
        if self.cuda:
            torch.cuda.synchronize()
        steps = len(self.ends)
        total = self._seconds(self.starts[0], self.ends[-1])
        inside = sum(self._seconds(a, b) for a, b in zip(self.starts, self.ends, strict=True))
        return {
            "step_s": total / steps,
            "images_per_s": self.images / total,
            "outside_share": max(0.0, 1 - inside / total),
        }


class StepClock(L.Callback):
    """Marks the steps from ``warmup`` on in a ``StepTimes``."""

    def __init__(self, times: StepTimes, warmup: int) -> None:
        self.times, self.warmup = times, warmup

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.warmup:
            self.times.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:  # global_step counts this step already
            self.times.end(len(batch[0]))


class MinimalModule(L.LightningModule):
    """A LightningModule with the loss alone: no logging, no checks, no callbacks."""

    def __init__(self, net: VAELitModule) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.net.compute_terms(batch[0])["loss"].mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.net.configure_optimizers()


BARE_PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
"""The precisions the bare loop runs, and the dtype it autocasts to."""


def _autocast(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """The bare loop's counterpart of Lightning's ``precision``."""
    dtype = BARE_PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def _forever(batches: Iterable) -> Iterator:
    while True:
        yield from batches


def bare_loop(
    model: VAELitModule,
    datamodule: CIFAR10DataModule,
    device: torch.device,
    args: argparse.Namespace,
) -> dict[str, float]:
    """The floor: the model's loss and optimizer in a plain loop over the same batches, moved
    to the device and scaled as Lightning does it; with ``--compile-step``, the step (forward,
    backward, update) compiled by ``torch.compile`` in that mode (``reduce-overhead`` replays
    it as a CUDA graph on a GPU)."""
    model.to(device).train()
    optimizer = model.configure_optimizers()
    autocast = _autocast(args.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")

    def train_step(x: Tensor) -> None:
        with autocast():
            loss = model.compute_terms(x)["loss"].mean()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    if args.compile_step:
        train_step = torch.compile(train_step, mode=args.compile_step)
    batches = datamodule.batches(datamodule.train_set, shuffle=True, device=device)
    times = StepTimes(cuda=device.type == "cuda")
    for step, (images, _) in enumerate(_forever(batches)):
        if step == args.warmup + args.steps:
            break
        x = datamodule.scale(images.to(device, non_blocking=True), training=True)
        if step >= args.warmup:
            times.start()
        train_step(x)
        if step >= args.warmup:
            times.end(len(x))
    return times.result()


def _config(args: argparse.Namespace, arch: str, on_device: bool, output_dir: str) -> DictConfig:
    overrides = [
        f"model/arch={arch}",
        f"data.data_dir={args.data_dir}",
        f"data.batch_size={args.batch_size}",
        f"data.on_device={on_device}",
        f"trainer.precision={args.precision}",
        f"logger={args.logger}",
        f"paths.output_dir={output_dir}",
        "run_name=bench",
        "run_group=null",
        "callbacks.model_summary.max_depth=0",  # kept, but prints no table
        "callbacks.progress_bar._target_=vae_lightning.training.progress_bars.ProgressLog",
        *(SMALL_MODEL if args.small else []),
        *args.set,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        try:
            return compose("train", overrides=overrides)
        except HydraException as err:
            raise ConfigError(f"--set {' '.join(args.set)}: {err}") from None


def _trainer(args: argparse.Namespace, callbacks: list[L.Callback], **kwargs) -> L.Trainer:
    """A Trainer with nothing of its own: no logger, checkpoints, progress bar or summary."""
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


def measure_loop(
    loop: str, cfg: DictConfig, datamodule: CIFAR10DataModule, args: argparse.Namespace
) -> dict[str, float]:
    """One timed window of ``loop`` (a key of LOOPS) on a freshly built, seeded model."""
    L.seed_everything(0, verbose=False)
    model = build(cfg, "model", _recursive_=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if loop == "bare":
        return bare_loop(model, datamodule, device, args)
    times = StepTimes(cuda=device.type == "cuda")
    clock = StepClock(times, args.warmup)
    cfg = cfg.copy()  # a folder of its own for the checkpoints and logs
    cfg.paths.output_dir = tempfile.mkdtemp(dir=cfg.paths.output_dir)
    stop = {"max_steps": args.warmup + args.steps, "max_epochs": -1, "limit_val_batches": 0}
    if loop in ("lightning", "module"):
        trainer = _trainer(args, [clock], **stop)
        trainer.fit(MinimalModule(model) if loop == "lightning" else model, datamodule=datamodule)
        return times.result()
    callbacks = [build(cfg, f"callbacks.{name}") for name in cfg.get("callbacks") or {}]
    loggers = [build(cfg, f"logger.{name}") for name in cfg.get("logger") or {}]
    trainer = build(
        cfg,
        "trainer",
        callbacks=[*callbacks, clock],
        logger=(loggers or False) if loop == "command" else False,
        devices=1,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **stop,
    )
    trainer.fit(model, datamodule=datamodule)
    return times.result()


def compare_loops(
    args: argparse.Namespace, arch: str, on_device: bool, loops: list[str]
) -> dict[str, dict[str, float]]:
    """Each loop's fastest window of ``args.rounds`` (on a shared machine, other work only adds
    time); the loops alternate within a round, so that a change in load reaches them alike."""
    with tempfile.TemporaryDirectory() as output_dir:
        cfg = _config(args, arch, on_device, output_dir)
        datamodule = build(cfg, "data")
        datamodule.prepare_data()
        datamodule.setup("fit")
        runs: dict[str, list[dict[str, float]]] = {loop: [] for loop in loops}
        for _ in range(args.rounds):
            for loop in loops:
                runs[loop].append(measure_loop(loop, cfg, datamodule, args))
    return {loop: min(results, key=lambda r: r["step_s"]) for loop, results in runs.items()}


def time_to_bpd(args: argparse.Namespace, arch: str) -> tuple[float, float, int]:
    """Wall time of fit until val/bpd <= target (validating every ``--val-every`` steps)."""
    with tempfile.TemporaryDirectory() as output_dir:
        cfg = _config(args, arch, on_device=True, output_dir=output_dir)
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argument_parser("vae_lightning.bench", __doc__)
    parser.add_argument("--archs", help="comma-separated (mlp,conv,resnet)")
    parser.add_argument("--small", action="store_true", help=f"small-model mode: {SMALL}, H = 8")
    parser.add_argument("--data-dir", default="data", help="the folder of cifar-10-batches-py/")
    parser.add_argument("--batch-size", type=int, help="images per step (128)")
    parser.add_argument("--precision", default="32-true", help="Lightning's precision setting")
    parser.add_argument("--threads", type=int, help="torch threads (all)")
    parser.add_argument("--warmup", type=int, help="steps before timing (10)")
    parser.add_argument("--steps", type=int, help="timed steps per window (50)")
    parser.add_argument("--rounds", type=int, default=3, help="windows per loop; the fastest")
    parser.add_argument("--loops", default=",".join(LOOPS), help="comma-separated, of: %(default)s")
    parser.add_argument("--paths", default="device", help="data paths: device,dataloader")
    parser.add_argument("--logger", default="csv", help="the train command's logger: csv, wandb")
    parser.add_argument("--set", action="append", default=[], help="a train config override")
    parser.add_argument(
        "--compile-step",
        choices=["default", "reduce-overhead", "max-autotune"],
        help="compile the bare loop's whole step with torch.compile in this mode",
    )
    parser.add_argument(
        "--target-bpd", type=float, help="also time each loop until val/bpd reaches this"
    )
    parser.add_argument("--val-every", type=int, default=100, help="steps, with --target-bpd")
    parser.add_argument("--max-epochs", type=int, default=10, help="with --target-bpd")
    parser.add_argument("--startup", action="store_true", help="also time start-up to step 1")
    parser.add_argument(
        "--output-root", default=str(Path("outputs") / "bench"), help="where runs and tables go"
    )
    args = parser.parse_args(argv)
    defaults = {"archs": "mlp,conv,resnet", "batch_size": 128, "warmup": 10, "steps": 50}
    for key, value in (SMALL if args.small else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.loops.split(",")) - LOOPS.keys()
    if unknown:
        parser.error(f"--loops: {sorted(unknown)} unknown; choose from {','.join(LOOPS)}")
    if "bare" in args.loops.split(",") and args.precision not in BARE_PRECISIONS:
        parser.error(
            f"--precision={args.precision}: the bare loop runs {', '.join(BARE_PRECISIONS)}"
            " (or leave it out with --loops)"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "vae_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_third_party_warnings()
    for expected in BENCH_WARNINGS:
        warnings.filterwarnings("ignore", message=expected)
    with one_line_errors():
        for line in measure(args):
            print(line, flush=True)


def measure(args: argparse.Namespace) -> Iterator[str]:
    """The report's lines: the setup, then a line per loop and data path."""
    yield f"device: {describe_device()}"
    versions = f"torch {torch.__version__}, lightning {L.__version__}"
    yield f"python {platform.python_version()}, {versions}"
    model = "small model (H = 8, hidden 32), " if args.small else ""
    yield (
        f"settings: {model}batch {args.batch_size}, precision {args.precision}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, best of {args.rounds} rounds"
        + (f", overrides {' '.join(args.set)}" if args.set else "")
        + (f", bare step compiled ({args.compile_step})" if args.compile_step else "")
    )
    yield (
        f"{'arch':7} {'loop':27} {'data path':13} {'ms/step':>8} {'images/s':>9} "
        f"{'outside':>8} {'x bare':>7} {'x Lightning':>11}"
    )
    loops = args.loops.split(",")
    for arch in args.archs.split(","):
        for path in args.paths.split(","):
            results = compare_loops(args, arch, path == "device", loops)
            floors = [results.get(floor) for floor in ("bare", "lightning")]
            for loop, r in results.items():
                ratios = [
                    f"{floor['step_s'] / r['step_s']:.2f}x" if floor else "-" for floor in floors
                ]
                yield (
                    f"{arch:7} {LOOPS[loop]:27} {path:13} {1000 * r['step_s']:8.2f} "
                    f"{r['images_per_s']:9.0f} {100 * r['outside_share']:7.1f}% "
                    f"{ratios[0]:>7} {ratios[1]:>11}"
                )
        if args.target_bpd is not None:
            seconds, bpd, steps = time_to_bpd(args, arch)
            reached = "reached" if bpd <= args.target_bpd else "NOT reached"
            yield (
                f"{arch:7} val/bpd <= {args.target_bpd}: {reached} after {seconds:.1f} s "
                f"({steps} steps, val/bpd {bpd:.4f})"
            )
    if args.startup:
        yield f"start-up to first training step (whole command): {startup_seconds(args):.1f} s"


if __name__ == "__main__":
    main()
