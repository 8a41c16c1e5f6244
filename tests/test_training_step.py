"""A training step never waits for the device, and what the loggers get is the mean of the steps
since the last logging step."""

import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, open_dict
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import (
    ADAM,
    MLP,
    PerturbDecoderAt,
    callback_overrides,
    composed,
    fit_in_process,
    head_config,
    metrics_csv,
    offline_wandb_run,
    run_train,
    single_run,
    write_cifar10,
)
from vae_lightning.train import train
from vae_lightning.training.lit_module import METRICS, VAELitModule
from vae_lightning.training.step_rows import DeviceRows
from vae_lightning.training.update_guards import UpdateGuards

HOST_READS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select"}
"""Operators whose result the host must wait for on a GPU: ``.item()``, ``bool()``, ``float()``
and comparisons of whole tensors, data-dependent shapes."""


class HostReadCounter(TorchDispatchMode):
    """Counts ``HOST_READS`` per training step: from one step's ``on_train_batch_start`` to the
    next one's, so a step's share includes Lightning's bookkeeping after it."""

    active: "HostReadCounter | None" = None

    def __init__(self) -> None:
        super().__init__()
        self.step: int | None = None
        self.reads: Counter[int] = Counter()
        self.names: dict[int, set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if self.step is not None and name in HOST_READS:
            self.reads[self.step] += 1
            self.names.setdefault(self.step, set()).add(name)
        return func(*args, **(kwargs or {}))


class MarkSteps(L.Callback):
    """Test callback, added from the config: tells ``HostReadCounter.active`` which step runs."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        HostReadCounter.active.step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        HostReadCounter.active.step = None


def job_config(*overrides: str) -> DictConfig:
    """The config ``python -m vae_lightning.train OVERRIDES`` runs with, in this process: Hydra's
    own part set as the command sets it."""
    cfg = composed(*overrides, hydra=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
        cfg.hydra.job.override_dirname = "test"
        HydraConfig.instance().set_config(cfg)
        del cfg["hydra"]
    return cfg


@pytest.mark.parametrize(
    "settings",
    [
        [],
        [
            "model.sigma_mode=optimal",
            "callbacks.update_guards.nonfinite_loss=skip",
            "callbacks.update_guards.skip_grad_norm=1e9",
            "model.kl_schedule.kind=linear",
        ],
    ],
    ids=["defaults", "every guard"],
)
def test_the_train_command_reads_nothing_from_the_device_between_logging_steps(tmp_path, settings):
    """The train command's own configuration (CSV logger, every default callback, the guards)
    for 20 steps, logging every 5: the host reads a value from the device at the logging steps
    alone. (The progress line, every 10 steps here and 100 by default, reads only the values
    logged at the logging steps, which live on the host.)"""
    data = write_cifar10(tmp_path / "data", images_per_file=64)  # 36 steps per epoch
    cfg = job_config(
        f"data.data_dir={data}",
        "data.batch_size=8",
        "model/arch=mlp",
        "model.arch.encoder.hidden_dims=[32]",
        "model.arch.decoder.hidden_dims=[32]",
        "logger=csv",
        "trainer.max_steps=20",
        "trainer.log_every_n_steps=5",
        "trainer.limit_val_batches=0",
        "~callbacks.model_checkpoint",  # it monitors val/bpd, and nothing validates here
        "callbacks.progress_bar.every_n_steps=10",
        "test=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        *callback_overrides("mark_steps", MarkSteps),
        *settings,
    )
    HostReadCounter.active = counter = HostReadCounter()
    with counter:
        train(cfg)
    logging_steps = {4, 9, 14, 19}
    assert {step: counter.names[step] for step in counter.reads if step not in logging_steps} == {}
    assert all(counter.reads[step] > 0 for step in logging_steps)  # the counter sees reads
    rows = [r for r in metrics_csv(tmp_path / "run") if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == sorted(logging_steps)


class RecordLosses(L.Callback):
    """Test callback, added from the command line: writes each training step's loss (the mean
    over its batch that ``training_step`` returned) and batch size to ``losses.json``."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append((trainer.global_step - 1, float(outputs["loss"]), len(batch[0])))

    def on_train_end(self, trainer, pl_module) -> None:
        Path("losses.json").write_text(json.dumps(self.steps))


@pytest.mark.cli
def test_each_logged_training_value_is_the_mean_over_the_steps_since_the_last_one(
    cifar_dir, tmp_path
):
    """72 images in five batches an epoch (of 15 or 14 images), logged every 3 steps: each
    logged train/loss is the image-weighted mean of the step losses since the last logging
    step, across an epoch's end too, and CSV and W&B get the same values."""
    args = [f"data.data_dir={cifar_dir}", "data.batch_size=16", "data.num_workers=0"]
    args += ["trainer.max_epochs=2", "trainer.log_every_n_steps=3", "logger=[csv,wandb]"]
    run_train([*args, *callback_overrides("record", RecordLosses)], tmp_path)
    steps = json.loads((tmp_path / "losses.json").read_text())
    assert len(steps) == 10 and len({size for *_, size in steps}) == 2
    expected = {}
    for end in (2, 5, 8):
        window = steps[end - 2 : end + 1]
        expected[end] = sum(loss * size for _, loss, size in window) / sum(s for *_, s in window)

    run = single_run(tmp_path)
    csv_rows = {int(r["step"]): float(r["train/loss"]) for r in metrics_csv(run) if r["train/loss"]}
    assert csv_rows == pytest.approx(expected, rel=1e-6)
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    history = offline_wandb_run(wandb_run)["history"]
    logged = {h["trainer/global_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert logged == csv_rows


def test_device_rows_hand_over_the_oldest_rows_and_keep_the_rest():
    rows = DeviceRows(2)
    for step in range(100):  # past the first buffer of 64 rows
        rows.append(torch.tensor([step, 2.0 * step]), tag=step)
    taken = rows.take(70)
    assert taken == [(step, [step, 2.0 * step]) for step in range(70)] and len(rows) == 30
    assert rows.take() == [(step, [step, 2.0 * step]) for step in range(70, 100)]
    assert rows.take() == [] and len(rows) == 0


class RecordingLogger(Logger):
    """Test logger: appends each row Lightning hands it to ``events``, in order."""

    def __init__(self, events: list) -> None:
        super().__init__()
        self.events = events

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.events.append(("log", step, dict(metrics)))


def record_terms(module: VAELitModule, events: list) -> None:
    """Spy on ``module.compute_terms``: append each batch's per-image terms to ``events``, with
    the split and the KL weight it ran with."""
    compute = module.compute_terms

    def recording(x, *args):
        terms = compute(x, *args)
        trainer = module.trainer
        split = "train" if trainer.training else "test" if trainer.testing else "val"
        if not trainer.sanity_checking:
            copied = {k: v.detach().double().clone() for k, v in terms.items()}
            events.append((split, module.current_beta(), copied))
        return terms

    module.compute_terms = recording


def image_mean(batches: list[dict[str, torch.Tensor]], name: str) -> float:
    return float(torch.cat([terms[name] for terms in batches]).mean())


class InfiniteKLAt(L.Callback):
    """Test callback: at the ``batch``-th training batch of the run, the encoder gives
    log-variances of -inf, so that sigma_q = 0: z and the reconstruction stay finite, the KL and
    the loss do not."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.seen = 0
        self.hook = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen == self.batch:
            self.hook = pl_module.vae.encoder.register_forward_hook(self.no_variance)
        self.seen += 1

    @staticmethod
    def no_variance(encoder, inputs, output):
        mu, logvar = output.chunk(2, dim=1)
        return torch.cat([mu, torch.full_like(logvar, -math.inf)], dim=1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None


@pytest.mark.parametrize(
    ("accumulate", "log_every", "infinite", "logged_steps"),
    [(1, 1, 2, [0, 1, 3, 4, 5, 6, 7, 8, 9]), (2, 2, 5, [1, 3, 5]), (2, 2, 6, [1, 3, 5])],
    ids=["every step", "two batches an update, the first infinite", "the second infinite"],
)
def test_logged_training_values_are_the_image_means_of_the_finite_steps_since_the_last(
    cifar_dir, tmp_path, accumulate, log_every, infinite, logged_steps
):
    """beta 0.5 rising from 0.2, free bits and a learned sigma (so loss, -ELBO and bpd all
    differ), two epochs of 5 batches, one batch with an infinite loss but a finite
    reconstruction: each logged train/* value is the image mean of the finite batches since the
    last row (a row with none has no train/* means); sigma follows the mean squared error of each
    finite update's images, once per update; the images trained, in the module and its
    checkpoint, count the finite batches. Batches accumulate into updates of ``accumulate``."""
    schedule = {"kind": "linear", "start": 0.2, "warmup_steps": 3}
    head = head_config("gaussian", sigma=0.3, sigma_mode="optimal")
    module = VAELitModule(
        MLP, ADAM, latent_dim=4, likelihood=head, beta=0.5, free_bits=0.05, kl_schedule=schedule
    )
    events: list = []
    record_terms(module, events)
    callbacks = [InfiniteKLAt(infinite), UpdateGuards(nonfinite_loss="skip")]
    trainer = fit_in_process(
        module,
        cifar_dir,
        tmp_path,
        16,
        callbacks,
        max_epochs=2,
        limit_val_batches=0,
        log_every_n_steps=log_every,
        accumulate_grad_batches=accumulate,
        logger=RecordingLogger(events),
    )
    batches = [terms for split, _, terms in events if split == "train"]
    sizes = [len(terms["loss"]) for terms in batches]
    assert len(sizes) == 10 and sum(sizes) == 2 * 72 and len(set(sizes)) == 2
    finite = [bool(terms["loss"].isfinite().all()) for terms in batches]
    assert finite == [i != infinite for i in range(10)]
    assert batches[infinite]["recon_mse"].isfinite().all()
    per_epoch = math.ceil(5 / accumulate)
    update = [epoch * per_epoch + i // accumulate for epoch in (0, 1) for i in range(5)]
    betas = [0.2 + 0.3 * min(step / 3, 1.0) for step in update]
    assert [beta for split, beta, _ in events if split == "train"] == pytest.approx(betas)

    rows, window = [], []
    for kind, step, values in events:
        if kind == "train" and values["loss"].isfinite().all():
            window.append(values)
        elif kind == "log":
            assert ("train/loss" in values) == bool(window)
            if window:
                rows.append((step, window, values))
            window = []
    assert [step for step, *_ in rows] == logged_steps and window == []
    for step, window, logged in rows:
        expected = {f"train/{name}": image_mean(window, name) for name in (*METRICS, "sigma")}
        expected["train/beta"] = 0.2 + 0.3 * min(step / 3, 1.0)
        assert {key: logged[key] for key in expected} == pytest.approx(expected, rel=1e-6)
    assert trainer.callback_metrics["train/bpd"] == pytest.approx(rows[-1][2]["train/bpd"])
    assert trainer.callback_metrics["train/bpd"].dtype == torch.float64  # no float32 rounding
    images = sum(size for size, ok in zip(sizes, finite, strict=True) if ok)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert module.images_trained == saved["images_trained"] == images

    variance = torch.tensor(0.3**2, dtype=torch.float64)
    for step in sorted(set(update)):
        members = [i for i in range(10) if update[i] == step]
        if all(finite[i] for i in members):
            mse = torch.cat([batches[i]["recon_mse"] for i in members]).mean()
            variance += 0.01 * (mse - variance)
    assert float(module.vae.likelihood.log_sigma) == pytest.approx(0.5 * math.log(variance))


def test_validation_and_test_metrics_are_the_image_means_of_their_split(cifar_dir, tmp_path):
    """Each validation logs the image mean of its batches' terms (8 validation images, in two
    batches), the best val/bpd so far, and val/bpd alone on the progress bar; a test logs
    the test split's means."""
    module = VAELitModule(MLP, ADAM, latent_dim=4, beta=2.0)
    events: list = []
    record_terms(module, events)
    trainer = fit_in_process(
        module,
        cifar_dir,
        tmp_path,
        5,
        [PerturbDecoderAt(0)],  # the second validation is worse than the first
        max_epochs=3,
        limit_train_batches=2,
        log_every_n_steps=1,
        logger=RecordingLogger(events),
    )
    validations, window = [], []
    for kind, _, values in events:
        if kind == "val":
            window.append(values)
        elif kind == "log" and "val/loss" in values:
            validations.append((window, values))
            window = []
    assert len(validations) == 3
    best = math.inf
    for window, logged in validations:
        assert len(window) == 2 and sum(len(terms["loss"]) for terms in window) == 8
        best = min(best, image_mean(window, "bpd"))
        expected = {f"val/{name}": image_mean(window, name) for name in METRICS}
        expected["val/bpd_best"] = best
        assert {key: logged[key] for key in expected} == pytest.approx(expected, rel=1e-6)
    bpds = [logged["val/bpd"] for _, logged in validations]
    assert bpds[1] > bpds[0] and best == pytest.approx(min(bpds))
    assert set(trainer.progress_bar_metrics) == {"val/bpd"}
    assert not any("train/beta" in values for kind, _, values in events if kind == "log")

    events.clear()
    trainer.test(module, datamodule=trainer.datamodule, verbose=False)
    tested = [values for kind, _, values in events if kind == "test"]
    assert sum(len(terms["loss"]) for terms in tested) == 16
    expected = {f"test/{name}": image_mean(tested, name) for name in METRICS}
    logged = events[-1][2]
    assert {key: logged[key] for key in expected} == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_cyclical_schedule_spans_a_run_bounded_by_epochs(cifar_dir, tmp_path, accumulate):
    """Two cycles over two epochs of 5 batches (10 updates, or 6 when two batches make one and
    an epoch's last batch makes one alone), rising over the first half of each cycle: beta per
    batch, by hand."""
    schedule = {"kind": "cyclical", "cycles": 2, "ratio": 0.5}
    module = VAELitModule(MLP, ADAM, latent_dim=4, beta=2.0, kl_schedule=schedule)
    events: list = []
    record_terms(module, events)
    fit_in_process(
        module,
        cifar_dir,
        tmp_path,
        16,
        max_epochs=2,
        limit_val_batches=0,
        accumulate_grad_batches=accumulate,
    )
    per_epoch = math.ceil(5 / accumulate)
    cycle = 2 * per_epoch / 2
    steps = [epoch * per_epoch + batch // accumulate for epoch in (0, 1) for batch in range(5)]
    expected = [2.0 * min((step % cycle) / cycle / 0.5, 1.0) for step in steps]
    assert [beta for *_, beta, _ in events] == pytest.approx(expected)


def test_the_iwae_objective_trains_on_its_k_sample_bound_and_validates_with_the_elbo(
    cifar_dir, tmp_path
):
    module = VAELitModule(MLP, ADAM, latent_dim=4, objective="iwae", iwae_samples=3)
    calls = []
    compute = module.compute_terms

    def recording(x, *args):
        calls.append((module.trainer.training, args))
        return compute(x, *args)

    module.compute_terms = recording
    fit_in_process(
        module,
        cifar_dir,
        tmp_path,
        16,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    assert calls == [(True, (3,)), (True, (3,)), (False, ())]


class RecordingStrategy:
    """Test strategy of a two-rank run whose other rank holds the same sums."""

    def __init__(self) -> None:
        self.reductions: list[str] = []

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        self.reductions.append(reduce_op)
        return 2 * tensor


@pytest.mark.parametrize("world_size", [1, 2])
def test_step_sums_cover_the_global_batch(world_size):
    """Each metric's sum over the batch's images, then the batch's size; under DDP, summed over
    the ranks (one reduction)."""
    module = VAELitModule(MLP, ADAM, latent_dim=4)
    strategy = RecordingStrategy()
    module._trainer = SimpleNamespace(world_size=world_size, strategy=strategy)
    module._step_names = ["loss", "kl"]
    terms = {"loss": torch.tensor([1.0, 2.0]), "kl": torch.tensor([3.0, 5.0]), "bpd": None}
    sums = module._global_sums(terms)
    assert sums.tolist() == [world_size * v for v in (3.0, 8.0, 2.0)]
    assert strategy.reductions == ["sum"] * (world_size - 1)
