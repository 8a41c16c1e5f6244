"""Scale-out through Hydra plugins: submitit (SLURM's local stand-in), joblib and Optuna."""

import json
import os
import re
import signal

import optuna
import pytest
import torch
import yaml

from tests.helpers import (
    SHORT,
    assert_run_folder,
    command_line,
    descendants,
    metrics_csv,
    resolved,
    run_train,
    start_train,
    sweep_jobs,
    wait_for_files,
)

pytestmark = pytest.mark.cli


def test_submitit_local_runs_each_job_and_a_requeued_job_resumes_from_its_checkpoint(
    cifar_dir, tmp_path
):
    """Two jobs under submitit; both get submitit's time-out signal mid-run (what SLURM sends
    before a time limit): each saves last.ckpt, is requeued, resumes from it and finishes."""
    args = [
        "-m",
        "hydra/launcher=submitit_local",
        "model.latent_dim=4,8",
        f"data.data_dir={cifar_dir}",
        "logger=csv",
        *SHORT[1:],
        "trainer.max_epochs=1000",
        "trainer.max_steps=60",
        "callbacks.last_checkpoint.every_n_train_steps=3",
    ]
    sweep = start_train(args, tmp_path)
    wait_for_files(sweep, tmp_path, "outputs/multiruns/*/*/*/checkpoints/last.ckpt", count=2)
    # the job processes this sweep's submitit started (not the sweep, nor its local controller)
    jobs = [p for p in descendants(sweep.pid) if "submitit.core._submit" in command_line(p)]
    assert len(jobs) == 2
    for pid in jobs:
        os.kill(pid, signal.SIGUSR2)
    output, _ = sweep.communicate(timeout=240)
    assert sweep.returncode == 0, output

    jobs = sweep_jobs(tmp_path)
    assert [j.name for j in jobs] == ["0", "1"]
    for job, latent_dim in zip(jobs, (4, 8), strict=True):
        assert_run_folder(job)
        assert resolved(job)["model"]["latent_dim"] == latent_dim
        assert "Resuming from" in (job / "train.log").read_text()
        final = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
        assert final["global_step"] == 60  # the requeued job went on to the end
        assert (job / "metrics.json").is_file()
        steps = [int(r["step"]) for r in metrics_csv(job) if r.get("train/loss")]
        # the rows from before the requeue are kept: the log starts at step 0, not at the resume
        assert steps[0] == 0 and max(steps) >= 59
    submitit_logs = "".join(p.read_text() for p in jobs[0].parent.glob(".submitit/*/*_log.*"))
    assert len(set(re.findall(r"Requeued job (\S+)", submitit_logs))) == 2
    saved = dict(re.findall(r"Preempted: saved (\S+) at step (\d+)", submitit_logs))
    assert sorted(saved) == [str(job / "checkpoints" / "last.ckpt") for job in jobs]
    assert all(0 < int(step) < 60 for step in saved.values())


def test_lightning_joins_the_tasks_slurm_started_into_one_ddp_run(cifar_dir, tmp_path):
    """What srun does on two nodes with one task each: the same command twice, told apart by
    SLURM's variables. Lightning's SLURM environment makes them ranks 0 and 1 of one run."""
    run_dir = tmp_path / "outputs" / "slurm_job"
    args = [
        f"data.data_dir={cifar_dir}",
        "logger=csv",
        *SHORT,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        f"hydra.run.dir={run_dir}",
    ]
    slurm = {
        "SLURM_JOB_ID": "7919",  # Lightning's MASTER_PORT: 10000 + its last 4 digits
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "2",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_LOCALID": "0",
    }
    tasks = [
        start_train(args, tmp_path, slurm | {"SLURM_PROCID": str(r), "SLURM_NODEID": str(r)})
        for r in (0, 1)
    ]
    outputs = [task.communicate(timeout=180)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outputs[0]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    assert_run_folder(run_dir)
    # 72 training images, 16 per rank and step on 2 ranks: 3 steps
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not (tmp_path / "outputs" / "runs").exists()  # no rank made a run folder of its own


def test_joblib_runs_jobs_in_parallel_processes(cifar_dir, tmp_path):
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model.latent_dim=4,8"]
    proc = run_train([*args, f"data.data_dir={cifar_dir}", "logger=csv", *SHORT], tmp_path)
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    jobs = sweep_jobs(tmp_path)
    for job, latent_dim in zip(jobs, (4, 8), strict=True):
        assert_run_folder(job)
        assert resolved(job)["model"]["latent_dim"] == latent_dim


def test_optuna_search_minimizes_val_bpd_and_continues_from_its_sqlite_study(cifar_dir, tmp_path):
    args = [
        "-m",
        "hparams_search=optuna",
        "model/arch=mlp",  # fixed: the search runs over latent size, sigma and learning rate
        f"data.data_dir={cifar_dir}",
        "logger=csv",
        *SHORT,
        "trainer.max_epochs=2",
    ]
    run_train([*args, "hydra.sweeper.n_trials=2"], tmp_path)
    run_train([*args, "hydra.sweeper.n_trials=1"], tmp_path)  # the same command, later

    study = optuna.load_study(
        study_name="vae_bpd", storage=f"sqlite:///{tmp_path}/outputs/optuna/vae_bpd.db"
    )
    trials = study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert trials[2].params not in (trials[0].params, trials[1].params)  # continued: new points
    sweeps = sorted((tmp_path / "outputs" / "multiruns").glob("*/*"))
    jobs = [job for sweep in sweeps for job in sorted(sweep.iterdir()) if job.is_dir()]
    assert len(sweeps) == 2 and len(jobs) == 3
    for trial, job in zip(trials, jobs, strict=True):
        assert {"model.latent_dim", "model.sigma", "model.optimizer.lr"} == set(trial.params)
        assert trial.params["model.latent_dim"] in (16, 32, 64, 128)
        assert 0.03 <= trial.params["model.sigma"] <= 0.3
        assert 1e-4 <= trial.params["model.optimizer.lr"] <= 3e-3
        model = resolved(job)["model"]
        assert model["latent_dim"] == trial.params["model.latent_dim"]
        assert model["optimizer"]["lr"] == pytest.approx(trial.params["model.optimizer.lr"])
        metrics = json.loads((job / "metrics.json").read_text())
        val_bpd = [float(r["val/bpd"]) for r in metrics_csv(job) if r.get("val/bpd")]
        assert len(val_bpd) == 2 and metrics["val/bpd_best"] == pytest.approx(min(val_bpd))
        assert trial.value == pytest.approx(min(val_bpd))  # the best val/bpd of the run
    results = yaml.safe_load((sweeps[1] / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(t.value for t in trials))
