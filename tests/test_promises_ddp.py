"""The README's promises off the happy path, each kept with 1 and with 2 DDP processes (gloo on
CPU), through the command line, with the output going to a file as on a cluster."""

import json
import shutil
import signal

import pytest
import torch
import yaml

from tests.helpers import (
    DDP,
    SHORT,
    assert_no_rank_changed_anything,
    metrics_csv,
    nonfinite_batch_at,
    perturb_decoder_at,
    run_train,
    single_run,
    start_train,
    sweep_jobs,
    wait_for_files,
    wandb_fails_at,
)

pytestmark = pytest.mark.cli

PROCESSES = {
    "1 process": (1, ["data.batch_size=16"]),
    "2 processes": (2, [*DDP, "data.batch_size=8"]),
}
"""World size and overrides: the same 16-image global batches, so that the 72 training images
make 5 steps per epoch either way."""


def with_processes(test):
    """Run ``test(..., world_size, processes)`` with 1 and with 2 processes."""
    return pytest.mark.parametrize(
        ("world_size", "processes"), list(PROCESSES.values()), ids=list(PROCESSES)
    )(test)


def train_to_file(args: list[str], cwd) -> tuple[int, str]:
    """Run a training command with its output going to a file, as under SLURM or nohup."""
    log_file = cwd / "output.log"
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as out:
        proc = start_train(args, cwd, stdout=out)
        proc.wait(timeout=300)
    return proc.returncode, log_file.read_text()


@with_processes
def test_a_nonfinite_step_is_skipped_on_every_rank_and_changes_nothing(
    cifar_dir, tmp_path, world_size, processes
):
    """Rank 0's batch is NaN at step 2: no rank updates its weights, sigma (optimal mode) or
    optimizer state; the step logs only the count of skipped steps; training goes on."""
    args = [f"data.data_dir={cifar_dir}", "logger=csv", *SHORT[:3], *processes]
    args += [
        "model.sigma_mode=optimal",
        "callbacks.update_guards.nonfinite_loss=skip",
        *nonfinite_batch_at(2),
    ]
    code, output = train_to_file(args, tmp_path)
    assert code == 0, output
    assert_no_rank_changed_anything(tmp_path, world_size)
    assert output.count("Non-finite loss at step 2: step skipped on every rank (1 so far)") == 1
    run = single_run(tmp_path)
    rows = metrics_csv(run)
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [0, 1, 3, 4]
    key = "train/nonfinite_skipped"
    counts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    assert counts == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 1)]
    assert not any(r.get("train/sigma") for r in rows if int(r["step"]) == 2)
    metrics = json.loads((run / "metrics.json").read_text())
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["nonfinite_skipped"] == 1 and checkpoint["global_step"] == 5

    # Readable progress in the file and in train.log, once (rank 0), without library noise.
    line = "epoch 1/1 (end) step 5 |"
    assert output.count(line) == 1 and line in (run / "train.log").read_text()
    assert "LeafSpec" not in output and "Tip:" not in output
    assert "sync_dist=True" not in output  # every logged validation figure is over all ranks
    if world_size == 2:
        assert "distributed_backend=gloo" in output
        assert "All distributed processes registered. Starting with 2 processes" in output


@with_processes
def test_a_nonfinite_loss_stops_every_rank_with_one_message(
    cifar_dir, tmp_path, world_size, processes
):
    args = [f"data.data_dir={cifar_dir}", "logger=csv", *SHORT[1:3], *processes]
    args += ["trainer.max_epochs=3", *nonfinite_batch_at(7, rank=world_size - 1)]
    code, output = train_to_file(args, tmp_path)
    assert code != 0 and "Traceback" not in output
    last = single_run(tmp_path) / "checkpoints" / "last.ckpt"
    assert (
        f"Error: The loss is nan at step 7 (epoch 1); the last good checkpoint is {last}" in output
    )
    assert torch.load(last, weights_only=True)["global_step"] == 5


@with_processes
def test_a_diverged_run_says_so_once_and_trains_on(cifar_dir, tmp_path, world_size, processes):
    """The decoder's weights are perturbed after epoch 0: epochs 1 and 2 validate far above
    epoch 0's bpd, and one warning (not one per rank or per epoch) names the best checkpoint."""
    args = [f"data.data_dir={cifar_dir}", "logger=csv", *SHORT[1:3], *processes]
    args += ["trainer.max_epochs=3", *perturb_decoder_at(0)]
    code, output = train_to_file(args, tmp_path)
    assert code == 0, output
    run = single_run(tmp_path)
    bpd = [float(r["val/bpd"]) for r in metrics_csv(run) if r.get("val/bpd")]
    assert len(bpd) == 3 and min(bpd[1:]) - bpd[0] > 1.0
    warnings = [line for line in output.splitlines() if "Training has diverged" in line]
    (best,) = (run / "checkpoints").glob("epoch000-*.ckpt")
    assert len(warnings) == 1, output
    assert f"val/bpd {bpd[1]:.3f} at epoch 1" in warnings[0]
    assert f"best, {bpd[0]:.3f} (checkpoint {best})" in warnings[0]


@with_processes
def test_sigterm_saves_and_the_resumed_run_continues_the_same_wandb_run(
    cifar_dir, tmp_path, world_size, processes
):
    args = [f"data.data_dir={cifar_dir}", *SHORT[1:3], *processes]
    first = tmp_path / "first"
    proc = start_train([*args, "trainer.max_epochs=1000"], first)
    wait_for_files(proc, first, "outputs/runs/*/*/checkpoints/last.ckpt")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in output, output
    assert output.count("SIGTERM: saved") == 1 and "weights_only" not in output
    run = single_run(first)
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["wandb_run_id"] == wandb_run.name.rsplit("-", 1)[1]

    max_steps = saved["global_step"] + 3
    resume = [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"trainer.max_steps={max_steps}"]
    code, output = train_to_file([*args, *resume], tmp_path / "second")
    assert code == 0, output
    second = single_run(tmp_path / "second")
    (resumed_run,) = (second / "wandb").glob("offline-run-*")
    assert resumed_run.name.endswith("-" + wandb_run.name.rsplit("-", 1)[1])  # the same run
    resumed = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == max_steps
    fit_seconds = json.loads((second / "metrics.json").read_text())["fit_seconds"]
    assert 0 < saved["fit_seconds"] < fit_seconds  # the interrupted run's time counts too


@with_processes
def test_wandb_failing_mid_run_goes_offline_and_training_goes_on(
    cifar_dir, tmp_path, world_size, processes
):
    args = [f"data.data_dir={cifar_dir}", *SHORT[1:3], *processes, "trainer.max_epochs=2"]
    code, output = train_to_file([*args, *wandb_fails_at(3)], tmp_path)
    assert code == 0, output
    assert output.count("W&B: logging failed") == 1
    run = single_run(tmp_path)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    (online,) = (run / "wandb").glob("offline-run-*")
    (fallback,) = (run / "wandb_fallback" / "wandb").glob("offline-run-*")
    assert fallback.name.rsplit("-", 1)[1] == online.name.rsplit("-", 1)[1]  # the same run id


def test_failing_ddp_jobs_do_not_stop_the_sweep(cifar_dir, tmp_path):
    """Job 0 stops on a NaN loss inside its DDP ranks, job 1 is refused before its ranks start
    (a negative step), and job 2 still runs; failed_jobs.yaml names both failures."""
    args = ["-m", f"data.data_dir={cifar_dir}", "logger=csv", *SHORT[1:3]]
    args += [*PROCESSES["2 processes"][1], "trainer.max_epochs=1", *nonfinite_batch_at(1)]
    args[-2] = "+callbacks.nonfinite.step=1,-5,1000"
    proc = run_train(args, tmp_path, expect_ok=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in output
    jobs = sweep_jobs(tmp_path)
    assert [(j.name, (j / "metrics.json").is_file()) for j in jobs] == [
        ("0", False),
        ("1", False),
        ("2", True),
    ]
    failed = yaml.safe_load((jobs[0].parent / "failed_jobs.yaml").read_text())
    assert [f["job"] for f in failed] == [0, 1]
    assert "The loss is nan at step 1 (epoch 0)" in failed[0]["error"]
    assert "callbacks.nonfinite was refused by" in failed[1]["error"]
    assert "step=-5: it must be an integer >= 0" in failed[1]["error"]


def test_bad_settings_under_ddp_fail_before_any_process_starts(cifar_dir, tmp_path):
    proc = run_train(
        [*DDP, f"data.data_dir={cifar_dir}", "model.latent_dim=0"], tmp_path, expect_ok=False
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "model.latent_dim=0 is not allowed" in proc.stderr
    assert "distributed_backend" not in proc.stdout + proc.stderr
    assert not list(tmp_path.glob("outputs/runs/*/*/checkpoints"))


def test_a_damaged_dataset_under_ddp_is_named_before_any_process_starts(cifar_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(cifar_dir, data)
    batch = data / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    code, output = train_to_file([*DDP, f"data.data_dir={data}", "logger=csv"], tmp_path)
    assert code != 0 and "Traceback" not in output
    assert output.count(f"Error: {batch} is not a CIFAR-10 batch") == 1
    assert "distributed_backend" not in output


@with_processes
def test_updates_over_the_gradient_norm_threshold_are_skipped_on_every_rank(
    cifar_dir, tmp_path, world_size, processes
):
    """With a threshold no gradient meets, no update happens on any rank; the skips are
    counted. (The test callback records step 2 without making any batch NaN: rank -1.)"""
    args = [f"data.data_dir={cifar_dir}", "logger=csv", *SHORT[:3], *processes]
    args += ["callbacks.update_guards.skip_grad_norm=1e-9", *nonfinite_batch_at(2, rank=-1)]
    code, output = train_to_file(args, tmp_path)
    assert code == 0, output
    assert_no_rank_changed_anything(tmp_path, world_size)
    rows = metrics_csv(single_run(tmp_path))
    skipped = [float(r["train/skipped_updates"]) for r in rows if r.get("train/skipped_updates")]
    assert skipped == [1, 2, 3, 4, 5]
    assert all(float(r["train/grad_norm"]) > 1e-9 for r in rows if r.get("train/grad_norm"))
