"""``python -m vae_lightning.train`` as a user runs it, on a tiny CIFAR-10 written by the tests."""

import csv
import importlib
import inspect
import json
import os
import pkgutil
import pty
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import vae_lightning
from tests.helpers import (
    DDP,
    SHORT,
    SPLITS_AND_METRICS,
    assert_one_folder_per_job,
    assert_run_folder,
    cli_env,
    composed,
    last_value,
    metrics_csv,
    offline_wandb_run,
    resolved,
    run_module,
    run_train,
    single_run,
    start_train,
    sweep_jobs,
    wait_for_files,
)
from vae_lightning import bench, fid, report, results
from vae_lightning.cli import one_line, one_line_errors
from vae_lightning.config import check_resume_checkpoint
from vae_lightning.errors import ConfigError, UserError
from vae_lightning.launch.hydra_callbacks import JobFailed
from vae_lightning.training.checkpoints import read_checkpoint
from vae_lightning.training.progress_bars import significant

pytestmark = pytest.mark.cli


def test_defaults_train_and_log_to_wandb_offline(cifar_dir, tmp_path):
    # the whole 72-image training set in one batch, as the default 128 would take it
    proc = run_train([f"data.data_dir={cifar_dir}", "data.batch_size=72"], cwd=tmp_path)
    run = single_run(tmp_path)
    assert_run_folder(run)
    out = proc.stdout + proc.stderr
    assert "W&B: no API key" in out and f"wandb sync {run / 'wandb'}/offline-run-*" in out
    assert "wandb: WARNING" not in out  # no stray warnings from W&B's own start
    (offline_run,) = (run / "wandb").glob("offline-run-*")
    recorded = offline_wandb_run(offline_run)
    # the dashboard compares runs by their best: val/bpd's summary is its minimum, and the
    # summary holds val/bpd_best, the test metrics, the parameters and the run's speed
    assert recorded["summaries"]["val/bpd"] == ["min"]
    val_bpd = [step["val/bpd"] for step in recorded["history"] if "val/bpd" in step]
    assert len(val_bpd) == 20
    summary, metrics = recorded["summary"], json.loads((run / "metrics.json").read_text())
    assert summary["val/bpd"] == {"min": pytest.approx(min(val_bpd))}
    assert summary["val/bpd_best"] == pytest.approx(min(val_bpd)) == metrics["val/bpd_best"]
    for key in ("test/bpd", "num_params", "fit_seconds", "images_per_second"):
        assert summary[key] == pytest.approx(metrics[key]), key
    trained = 20 * 72  # 20 epochs of the fixture's 72 training images
    assert metrics["images_per_second"] == pytest.approx(trained / metrics["fit_seconds"])
    cfg = resolved(run)
    assert cfg["model"]["latent_dim"] == 32 and cfg["trainer"]["max_epochs"] == 20
    assert cfg["run_group"] is None
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["epoch"] == 19 and checkpoint["hyper_parameters"]["latent_dim"] == 32
    # a CSV beside W&B, with the same history
    assert [float(r["val/bpd"]) for r in metrics_csv(run) if r["val/bpd"]] == val_bpd
    # the model summary: the VAE's parameters and FLOPs per image, not the metric objects
    lines = [line.split("│") for line in proc.stdout.splitlines() if line.startswith("│ ")]
    rows = [cells for cells in lines if cells[1].strip().isdigit()]
    assert [cells[2].strip() for cells in rows] == ["vae", "eval_metrics"]
    flops = rows[0][6].strip()
    assert flops.endswith("M") and float(flops[:-1]) > 1  # sizes from an example pass
    # the test metrics: one line, four significant digits, units
    (line,) = [line for line in out.splitlines() if "Test of the best checkpoint:" in line]
    assert f"test/bpd {significant(metrics['test/bpd'])} bits/dim |" in line
    assert "Test metric" not in out  # Lightning's table of 17-digit values


def test_overrides_reach_the_model_and_every_metric_is_logged(cifar_dir, tmp_path):
    run_train(
        [
            "model.latent_dim=64",
            "model.sigma=0.1",
            "model/arch=resnet",
            f"data.data_dir={cifar_dir}",
            "logger=csv",
            *SHORT,
        ],
        cwd=tmp_path,
    )
    run = single_run(tmp_path)
    assert_run_folder(run)
    cfg = resolved(run)
    assert cfg["model"]["latent_dim"] == 64 and cfg["model"]["sigma"] == 0.1
    assert cfg["model"]["arch"]["encoder"]["_target_"].endswith("ResNetEncoder")
    assert cfg["run_name"] == (
        "data.batch_size=16,data.num_workers=0,model.latent_dim=64,model.sigma=0.1,"
        "model/arch=resnet,trainer.log_every_n_steps=1,trainer.max_epochs=1"
    )  # every override but the data folder and the logger, which say nothing of the model
    rows = metrics_csv(run)
    for key in SPLITS_AND_METRICS:
        assert any(r.get(key) for r in rows), key
    # bpd is the ELBO in bits per dimension plus the 8 bits of the 1/256 discretization.
    elbo, bpd = last_value(rows, "test/elbo"), last_value(rows, "test/bpd")
    assert bpd == pytest.approx(-elbo / (3072 * 0.6931471805599453) + 8.0, rel=1e-5)
    hparams = yaml.safe_load((run / "csv" / "hparams.yaml").read_text())
    assert hparams["model.latent_dim"] == 64  # the resolved config, flat


def test_experiment_preset_sweeps_a_group_with_one_folder_per_job(cifar_dir, tmp_path):
    run_train(
        ["experiment=sweep_arch", f"data.data_dir={cifar_dir}", "logger=csv", *SHORT, "-m"],
        cwd=tmp_path,
    )
    jobs = assert_one_folder_per_job(tmp_path, "model/arch", ["mlp", "conv", "resnet"])
    targets = [resolved(j)["model"]["arch"]["encoder"]["_target_"] for j in jobs]
    assert [t.rsplit(".", 1)[1] for t in targets] == ["MLPEncoder", "ConvEncoder", "ResNetEncoder"]
    assert all(resolved(j)["tags"] == ["sweep_arch"] for j in jobs)


def test_one_and_two_processes_give_the_same_loss_curve_for_the_same_global_batch(
    cifar_dir, tmp_path
):
    """16 images per step on one process, or 8 on each of two: the same images per step (the
    device path splits each global batch across ranks) and train metrics reduced over both
    ranks. Only the posterior noise differs, so the curves agree to sampling noise."""
    common = [
        f"data.data_dir={cifar_dir}",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "data.num_workers=0",
        "data.dequantize=false",
        "callbacks.image_grids.every_n_epochs=1",
        "logger=[csv,wandb]",
        "logger.wandb.log_model=true",
    ]
    run_train([*common, "data.batch_size=16"], tmp_path / "one")
    run_train([*common, "data.batch_size=8", *DDP], tmp_path / "two")
    curves = {}
    for name in ("one", "two"):
        rows = metrics_csv(single_run(tmp_path / name))
        curves[name] = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(curves["one"]) == len(curves["two"]) == 10  # 72 images / 16 per step, 2 epochs
    assert curves["two"] == pytest.approx(curves["one"], rel=0.005)

    run = single_run(tmp_path / "two")  # rank 0 alone wrote the checkpoints, images and W&B run
    assert_run_folder(run)
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    recorded = offline_wandb_run(wandb_run)  # the global numbers, and the checkpoints logged
    metrics = json.loads((run / "metrics.json").read_text())
    assert recorded["summary"]["val/bpd_best"] == pytest.approx(metrics["val/bpd_best"])
    assert metrics["images_per_second"] == pytest.approx(2 * 72 / metrics["fit_seconds"])
    assert recorded["artifacts"] == [f"model-{recorded['run'].run_id}"] * 2  # best and last
    assert len(list((run / "images").glob("samples_epoch=*.png"))) == 2
    assert len(list((tmp_path / "two" / "outputs" / "runs").glob("*/*"))) == 1


def test_ddp_inside_a_multirun_gives_one_folder_and_one_wandb_run_per_job(cifar_dir, tmp_path):
    proc = run_train(
        ["-m", "model.latent_dim=8,16", *DDP, f"data.data_dir={cifar_dir}", *SHORT], cwd=tmp_path
    )
    jobs = sweep_jobs(tmp_path)
    assert [p.name for p in jobs] == ["0", "1"]
    for job, latent_dim in zip(jobs, (8, 16), strict=True):
        assert_run_folder(job)
        assert resolved(job)["model"]["latent_dim"] == latent_dim
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1
    assert resolved(jobs[0])["run_group"] == resolved(jobs[1])["run_group"]
    # no rank started a sweep or a single run of its own
    assert not (tmp_path / "outputs" / "runs").exists()
    assert proc.stdout.count("Launching 2 jobs locally") == 1

    # the sweep's report goes to W&B too: a run in the jobs' group with the table and plots
    sweep = jobs[0].parent
    reported = run_module("vae_lightning.report", [str(sweep)], cwd=tmp_path)
    assert "Logged the report to W&B (offline)" in reported.stdout
    (report_run,) = (sweep / "wandb").glob("offline-run-*")
    recorded = offline_wandb_run(report_run)
    assert recorded["run"].run_group == resolved(jobs[0])["run_group"]
    assert recorded["run"].job_type == "report"
    (logged,) = recorded["history"]
    table = json.loads((report_run / "files" / logged["report/table"]["path"]).read_text())
    with open(sweep / "report.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert table["columns"] == rows[0] and len(table["data"]) == len(rows) - 1 == 2
    plots = {f"report/{png.stem}" for png in sweep.glob("*.png")}
    assert plots and plots == {k for k in logged if k.startswith("report/")} - {"report/table"}


@pytest.fixture(scope="module")
def trained_learned_sigma(cifar_dir, tmp_path_factory) -> tuple[list[str], Path]:
    """The arguments of a one-epoch run with H = 8 and a learned sigma, and its last.ckpt."""
    args = [
        f"data.data_dir={cifar_dir}",
        "logger=csv",
        *SHORT,
        "model.latent_dim=8",
        "model.sigma_mode=learned",
    ]
    cwd = tmp_path_factory.mktemp("learned_sigma")
    run_train(args, cwd=cwd)
    return args, single_run(cwd) / "checkpoints" / "last.ckpt"


def test_resume_from_last_checkpoint_continues_where_it_stopped(cifar_dir, tmp_path):
    args = [f"data.data_dir={cifar_dir}", "logger=csv", *SHORT[1:]]
    run_train([*args, "trainer.max_epochs=1"], cwd=tmp_path / "first")
    first = single_run(tmp_path / "first")
    last = first / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    steps_per_epoch = saved["global_step"]
    assert steps_per_epoch == 5  # 72 images in batches of 16
    first_fit = json.loads((first / "metrics.json").read_text())["fit_seconds"]
    assert 0 < saved["fit_seconds"] <= first_fit and saved["images_trained"] == 72

    started = time.perf_counter()
    run_train([*args, "trainer.max_epochs=3", f"ckpt_path={last}"], cwd=tmp_path / "second")
    second_wall = time.perf_counter() - started
    second = single_run(tmp_path / "second")
    resumed = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 3 * steps_per_epoch
    epochs = {int(r["epoch"]) for r in metrics_csv(second) if r.get("train/loss")}
    assert epochs == {1, 2}  # epoch 0 was not trained again
    val_bpd = [
        float(r["val/bpd"]) for run in (first, second) for r in metrics_csv(run) if r["val/bpd"]
    ]
    metrics = json.loads((second / "metrics.json").read_text())
    assert len(val_bpd) == 3 and metrics["val/bpd_best"] == pytest.approx(min(val_bpd))
    # the time and images of the run it resumed count too (a requeued job reports its whole fit)
    assert saved["fit_seconds"] < metrics["fit_seconds"] < saved["fit_seconds"] + second_wall
    assert metrics["images_per_second"] == pytest.approx(3 * 72 / metrics["fit_seconds"])


def test_debug_preset_with_tensorboard(cifar_dir, tmp_path):
    args = [
        "debug=default",
        "logger=tensorboard",
        f"data.data_dir={cifar_dir}",
        "data.batch_size=72",
    ]
    run_train(args, cwd=tmp_path)
    run = single_run(tmp_path)
    assert_run_folder(run)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    epochs = sorted(p.name for p in (run / "images").glob("samples_*.png"))
    assert epochs == ["samples_epoch=000.png", "samples_epoch=001.png"]  # every epoch in debug


def test_fast_dev_run_without_logger(cifar_dir, tmp_path):
    proc = run_train(
        ["debug=fast_dev_run", "logger=none", f"data.data_dir={cifar_dir}", "data.batch_size=72"],
        cwd=tmp_path,
    )
    assert "test/bpd" in proc.stdout
    run = single_run(tmp_path)
    assert (run / "config.yaml").is_file() and not (run / "wandb").exists()


def test_same_seed_same_numbers(cifar_dir, tmp_path):
    args = [f"data.data_dir={cifar_dir}", "logger=csv", "seed=3", "trainer.deterministic=true"]
    for name in ("a", "b"):
        run_train([*args, *SHORT], cwd=tmp_path / name)
    a, b = (metrics_csv(single_run(tmp_path / name)) for name in ("a", "b"))
    assert a == b
    assert last_value(a, "test/elbo") < 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.latent_dim=0", "model.latent_dim=0 is not allowed: model.latent_dim must be"),
        (  # added by force where no Gaussian head reads it
            "model/likelihood=logistic_mixture +model.sigma=0.3",
            "model.sigma=0.3 is not allowed: nothing reads model.sigma.",
        ),
        (
            "data.batch_size=73",
            "data.batch_size=73 is larger than the training set (72 images once "
            "data.val_fraction=0.1 went to validation): use data.batch_size=72 or less.",
        ),
        ("model/arch=nope", "Available options in 'model/arch':"),
    ],
)
def test_bad_settings_fail_before_training_with_one_message(cifar_dir, tmp_path, override, message):
    proc = run_train(
        [*override.split(), f"data.data_dir={cifar_dir}"], cwd=tmp_path, expect_ok=False
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("outputs/runs/*/*/checkpoints"))


def test_every_error_the_package_defines_is_a_user_error_shown_in_one_line():
    defined = []
    for found in pkgutil.walk_packages(vae_lightning.__path__, "vae_lightning."):
        module = importlib.import_module(found.name)
        defined += [
            cls
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, Exception) and cls.__module__ == module.__name__
        ]
    errors = [cls for cls in defined if cls is not JobFailed]  # it carries a line to Hydra
    assert len(errors) >= 10 and all(issubclass(cls, UserError) for cls in errors), errors
    for cls in errors:
        line = one_line(cls("what is wrong and what to do"))
        assert line == f"{cls.label}: what is wrong and what to do", cls


def test_a_failed_allocation_is_one_line_naming_what_to_lower():
    message = r"^Error: out of memory \(\d+\.\d\d GiB could not be allocated\)\. Lower data\."
    with pytest.raises(SystemExit, match=message), one_line_errors():
        torch.empty(2**62, dtype=torch.uint8)  # more than any machine has


def test_missing_dataset_gives_one_clear_error(tmp_path):
    proc = run_train(["data.download=false", "logger=csv"], cwd=tmp_path, expect_ok=False)
    assert proc.returncode != 0
    assert f"CIFAR-10 was not found in {tmp_path / 'data' / 'cifar-10-batches-py'}" in proc.stderr


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        (
            [*DDP, "model.latent_dim=16"],  # refused before any rank starts
            ["model.latent_dim: checkpoint 8, this run 16"],
        ),
        (
            ["model.sigma_mode=fixed", "model.sigma=0.2"],
            [
                "model.sigma: checkpoint 0.1, this run 0.2",
                "model.sigma_mode: checkpoint learned, this run fixed",
            ],
        ),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_model_and_keeps_it(
    trained_learned_sigma, tmp_path, changed, expected
):
    args, last = trained_learned_sigma
    before = last.read_bytes()
    proc = run_train([*args, *changed, f"ckpt_path={last}"], cwd=tmp_path, expect_ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"ckpt_path={last} holds a different model (" in proc.stderr
    for difference in expected:
        assert difference in proc.stderr
    assert last.read_bytes() == before
    assert not list(tmp_path.glob("outputs/runs/*/*/checkpoints"))


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        ("model.latent_dim=16", "model.latent_dim: checkpoint 8, this run 16"),
        (
            "model/arch=mlp",
            "model.arch.encoder._target_: checkpoint vae_lightning.core.architectures.ConvEncoder, "
            "this run vae_lightning.core.architectures.MLPEncoder",
        ),
        (
            "model.optimizer._target_=torch.optim.SGD",
            "model.optimizer._target_: checkpoint torch.optim.Adam, this run torch.optim.SGD",
        ),
    ],
)
def test_resume_names_each_model_setting_that_differs(trained_learned_sigma, changed, expected):
    args, last = trained_learned_sigma
    with pytest.raises(ConfigError) as err:
        check_resume_checkpoint(composed(*args, changed, f"ckpt_path={last}"))
    assert expected in str(err.value)


def test_resume_applies_settings_that_may_change(trained_learned_sigma, tmp_path):
    """A new learning rate reaches the restored optimizer; batch size, epochs, beta and the
    logger may change too."""
    args, last = trained_learned_sigma
    changed = ["model.optimizer.lr=0.0005", "data.batch_size=8", "trainer.max_epochs=2"]
    proc = run_train(
        [*args, *changed, "model.beta=0.5", "logger=none", f"ckpt_path={last}"], tmp_path
    )
    assert "model.optimizer.lr=0.0005 (the checkpoint had 0.001)" in proc.stdout
    (run,) = tmp_path.glob("outputs/runs/*/*")
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0005
    assert resumed["global_step"] == 5 + 9  # 72 images: 5 steps of 16, then 9 of 8


def test_truncated_dataset_file_gives_one_clear_error(cifar_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(cifar_dir, data)
    batch = data / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:1000])
    proc = run_train([f"data.data_dir={data}", "logger=csv"], tmp_path, expect_ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{batch} is not a CIFAR-10 batch" in proc.stderr and "download it again" in proc.stderr


def test_diverging_run_stops_with_the_step_and_what_to_do(cifar_dir, tmp_path):
    args = [f"data.data_dir={cifar_dir}", "logger=csv", *SHORT, "model.optimizer.lr=1e12"]
    proc = run_train(args, tmp_path, expect_ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "The loss is " in proc.stderr and " at step 1 (epoch 0)" in proc.stderr
    assert "no checkpoint was written yet: restart with a lower model.optimizer.lr" in proc.stderr


def test_a_failing_job_does_not_stop_the_sweep(cifar_dir, tmp_path):
    args = ["-m", "model.sigma=0.1,-1,0.2", f"data.data_dir={cifar_dir}", "logger=csv", *SHORT]
    proc = run_train(args, tmp_path, expect_ok=False)
    assert proc.returncode != 0  # the sweep as a whole reports the failure ...
    jobs = sweep_jobs(tmp_path)
    assert [(j.name, (j / "metrics.json").is_file()) for j in jobs] == [
        ("0", True),
        ("1", False),
        ("2", True),
    ]  # ... after running the jobs after it
    out = proc.stdout + proc.stderr
    assert "Job 1 (model.sigma=-1 " in out and "model.sigma must be a number > 0" in out
    failed = yaml.safe_load((jobs[0].parent / "failed_jobs.yaml").read_text())
    assert [f["job"] for f in failed] == [1] and "model.sigma=-1" in failed[0]["overrides"]
    report.write_report(jobs[0].parent)
    table = (jobs[0].parent / "report.md").read_text()
    assert "failed or unfinished): 1\n- job 1: JobFailed: Invalid configuration" in table


def test_kill_9_loses_at_most_the_steps_since_the_last_checkpoint(cifar_dir, tmp_path):
    args = [f"data.data_dir={cifar_dir}", "logger=csv", *SHORT[1:], "trainer.max_epochs=1000"]
    every = ["callbacks.last_checkpoint.every_n_train_steps=3"]
    first = tmp_path / "first"
    proc = start_train([*args, *every], first)
    try:
        wait_for_files(proc, first, "outputs/runs/*/*/checkpoints/last.ckpt")
        time.sleep(2)  # let it train on and write more checkpoints, then kill it mid-run
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    last = next(first.glob("outputs/runs/*/*/checkpoints/last.ckpt"))
    saved = torch.load(last, weights_only=True)  # loads: never half-written
    assert saved["global_step"] > 0 and saved["global_step"] % 3 == 0
    for path in last.parent.glob("*.ckpt"):  # a temporary may be left, but no partial file
        read_checkpoint(path)

    run_train(
        [*args, *every, f"ckpt_path={last}", "trainer.max_steps=" + str(saved["global_step"] + 3)],
        tmp_path / "second",
    )
    resumed = torch.load(
        next((tmp_path / "second").glob("outputs/runs/*/*/checkpoints/last.ckpt")),
        weights_only=True,
    )
    assert resumed["global_step"] == saved["global_step"] + 3  # went on from the saved step


@pytest.mark.parametrize("multirun", [[], ["-m", "model.latent_dim=4,8"]])
def test_an_output_folder_that_cannot_be_created_is_named_before_anything_runs(
    cifar_dir, tmp_path, multirun
):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = [*multirun, f"data.data_dir={cifar_dir}", f"paths.output_root={blocker}/outputs"]
    proc = run_train(args, tmp_path, expect_ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{blocker} is not a writable folder. Set paths.output_root=" in proc.stderr
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer=adam", "Could not override 'optimizer'"),  # no such group or key
        ("hparams_search=grid", "Could not find 'hparams_search/grid'"),  # no such option ...
        ("trainer=tpu", "Available options in 'trainer'"),  # ... and the ones there are
        ("paths.output_root=", "paths.output_root='' is not allowed"),  # not "/" + runs/...
    ],
)
def test_unknown_groups_and_options_are_named_before_anything_runs(
    cifar_dir, tmp_path, override, expected
):
    proc = run_train([f"data.data_dir={cifar_dir}", override], tmp_path, expect_ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert expected in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_no_epoch_limit_writes_image_grids_every_n_epochs_and_at_the_end(cifar_dir, tmp_path):
    args = [f"data.data_dir={cifar_dir}", "logger=none", *SHORT[1:], "trainer.max_epochs=-1"]
    run_train([*args, "trainer.max_steps=35", "callbacks.image_grids.every_n_epochs=5"], tmp_path)
    images = sorted(p.name for p in (single_run(tmp_path) / "images").glob("samples_*.png"))
    assert images == ["samples_epoch=004.png", "samples_epoch=006.png"]  # 5 steps per epoch


def test_in_a_terminal_the_bar_shows_the_training_loss_and_the_last_val_bpd(cifar_dir, tmp_path):
    """stdout is a pseudo-terminal here, as in an interactive shell. A logger's version number
    (``v_num``, the W&B run id's last characters), which tells nothing here, is not shown. The
    run's ``train.log`` gets the per-epoch lines, as when the output goes to a file."""
    main, terminal = pty.openpty()
    args = [f"data.data_dir={cifar_dir}", "logger=wandb", *SHORT, "test=false"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vae_lightning.train", *args],
        cwd=tmp_path,
        env=cli_env(tmp_path) | {"COLUMNS": "200"},
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait(timeout=120) == 0
    text = output.decode(errors="replace")
    assert "train/loss:" in text and "val/bpd:" in text and "v_num" not in text
    assert "Epoch 1/1" in text and "Epoch 0/0" not in text  # counted as the log lines count
    assert "(end) step" not in text  # the plain lines are for output that goes to a file ...
    history = (single_run(tmp_path) / "train.log").read_text()
    assert "epoch 1/1 (end) step 5 | " in history and " | val/bpd " in history  # ... and the log


def test_ema_of_the_weights_from_the_command_line(cifar_dir, tmp_path):
    args = [f"data.data_dir={cifar_dir}", "logger=csv", *SHORT, "callbacks=[default,ema]"]
    run_train([*args, "callbacks.ema.decay=0.9"], tmp_path)
    run = single_run(tmp_path)
    assert_run_folder(run)
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    key = "vae.decoder.0.weight"
    assert not torch.equal(saved["state_dict"][key], saved["current_model_state"][key])
    assert resolved(run)["callbacks"]["ema"]["decay"] == 0.9


@pytest.mark.parametrize("command", [results, report, fid, bench])
def test_help_reads_as_plain_text_with_the_defaults(command, capsys):
    with pytest.raises(SystemExit) as stop:
        command.main(["--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0 and text.startswith("usage: python -m vae_lightning.")
    assert "``" not in text  # the docstring's literal marks
    if command in (fid, bench):
        assert "(default: data)" in text and "(default: None)" not in text
