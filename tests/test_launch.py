"""Run bookkeeping for scaled-out sweeps: plugins, GPU slots, SLURM settings, requeued jobs."""

import multiprocessing
import multiprocessing.synchronize
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import composed
from vae_lightning.launch import gpu_slots, plugins
from vae_lightning.launch.gpu_slots import claim_slot
from vae_lightning.launch.hydra_callbacks import CheckBeforeLaunch, record_failure
from vae_lightning.launch.plugins import check_plugins
from vae_lightning.launch.run_files import last_checkpoint
from vae_lightning.training.lit_module import VAELitModule


def test_a_missing_plugin_gets_the_pip_command(monkeypatch):
    monkeypatch.setattr(plugins.importlib.util, "find_spec", lambda name: None)
    for arg, extra in [
        ("hydra/launcher=submitit_slurm", "slurm"),
        ("hydra/launcher=slurm", "slurm"),
        ("hydra/launcher=joblib", "joblib"),
        ("hparams_search=optuna", "optuna"),
    ]:
        with pytest.raises(SystemExit) as err:
            check_plugins(["-m", "model.latent_dim=8", arg])
        assert f'pip install -e ".[{extra}]"' in str(err.value) and arg in str(err.value)
    check_plugins(["-m", "model.latent_dim=8,16"])  # no plugin named: nothing to check


def test_installed_plugins_pass():
    check_plugins(
        ["hydra/launcher=submitit_local", "hydra/launcher=joblib", "hparams_search=optuna"]
    )


def test_slots_are_exclusive_and_freed(tmp_path):
    with claim_slot(tmp_path, 2) as first, claim_slot(tmp_path, 2) as second:
        assert (first, second) == (0, 1)
        taken: list[int] = []
        waiter = threading.Thread(
            target=lambda: taken.append(claim_slot(tmp_path, 2, poll_s=0.05).__enter__())
        )
        waiter.start()
        time.sleep(0.3)
        assert taken == []  # both slots are held: it waits
    waiter.join(timeout=5)
    assert taken in ([0], [1])  # and gets one once they are free


def test_joblib_jobs_get_a_gpu_each(monkeypatch, tmp_path):
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    hydra_cfg = OmegaConf.create(
        {"launcher": {"_target_": joblib}, "sweep": {"dir": str(tmp_path)}, "job": {"num": 0}}
    )
    monkeypatch.setattr(gpu_slots.HydraConfig, "get", staticmethod(lambda: hydra_cfg))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    first, second = composed("trainer=gpu"), composed("trainer=gpu")
    with gpu_slots.gpu_of_its_own(first), gpu_slots.gpu_of_its_own(second):
        assert (list(first.trainer.devices), list(second.trainer.devices)) == ([0], [1])
    ddp = composed("trainer=ddp", "trainer.devices=2")
    with gpu_slots.gpu_of_its_own(ddp):  # a multi-GPU job is left alone
        assert ddp.trainer.devices == 2


def test_slurm_preset_asks_one_task_per_gpu_on_each_node():
    cfg = composed(
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        hydra=True,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
    CheckBeforeLaunch().on_multirun_start(cfg)  # integers: accepted


def test_slurm_preset_submits_the_nodes_gpus_time_and_partition_of_the_config(
    tmp_path, monkeypatch
):
    """The sbatch script the SLURM launcher writes (sbatch itself is stubbed: no SLURM here)."""
    import submitit.core.utils
    from hydra.core.utils import setup_globals
    from hydra.utils import instantiate

    class Submitted(Exception):
        pass

    scripts: list[str] = []

    def sbatch(command_function, *args, **kwargs):
        scripts.append(Path(command_function.command[-1]).read_text())
        raise Submitted

    monkeypatch.setattr(submitit.core.utils.CommandFunction, "__call__", sbatch)
    fake_bin = tmp_path / "bin"  # submitit looks for srun before it writes anything
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    setup_globals()
    cfg = composed(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "trainer=ddp",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        f"paths.output_root={tmp_path}",
        hydra=True,
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([["model.latent_dim=32"], ["model.latent_dim=64"]], initial_job_idx=0)
    (script,) = scripts
    for option in (
        "--nodes=2",
        "--ntasks-per-node=4",  # one process per GPU: Lightning's SLURM environment
        "--gpus-per-node=4",
        "--partition=gpu",
        "--time=240",
        "--signal=USR2@120",  # the time-out warning: checkpoint, then requeue
        "--array=0-1%2",  # one array task per sweep job, both at once
    ):
        assert f"#SBATCH {option}" in script.splitlines(), option


def test_slurm_preset_refuses_devices_auto(tmp_path):
    cfg = composed(
        "hydra/launcher=slurm", "trainer=ddp", f"paths.output_root={tmp_path}", hydra=True
    )
    with pytest.raises(SystemExit) as err:
        CheckBeforeLaunch().on_multirun_start(cfg)
    assert "hydra.launcher.tasks_per_node must be an integer" in str(err.value)
    assert "Value 'auto'" in str(err.value)
    assert "trainer.devices=<GPUs per node>" in str(err.value)


def test_optuna_study_folder_is_created_before_the_search(tmp_path):
    cfg = composed("hparams_search=optuna", f"paths.output_root={tmp_path}/out", hydra=True)
    assert cfg.hydra.sweeper.storage == f"sqlite:///{tmp_path}/out/optuna/vae_bpd.db"
    CheckBeforeLaunch().on_multirun_start(cfg)
    assert (tmp_path / "out" / "optuna").is_dir()


def test_last_checkpoint_of_a_run_folder(tmp_path):
    assert last_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")


def test_each_ddp_rank_draws_its_own_noise(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "42")
    draws = []
    for rank in (0, 1):
        module = VAELitModule.__new__(VAELitModule)
        trainer = SimpleNamespace(world_size=2, global_rank=rank)
        monkeypatch.setattr(VAELitModule, "trainer", property(lambda self, t=trainer: t))
        monkeypatch.setattr(VAELitModule, "global_rank", property(lambda self, r=rank: r))
        module.on_fit_start()
        draws.append(torch.randn(8))
    assert not torch.equal(draws[0], draws[1])


def _record_failures(path: str, worker: int, start: multiprocessing.synchronize.Barrier) -> None:
    start.wait()
    for entry in range(5):
        record_failure(Path(path), {"job": worker, "entry": entry})


def test_jobs_failing_at_the_same_time_lose_no_entry(tmp_path):
    """Parallel launchers (joblib, submitit) record failures from separate processes."""
    path = tmp_path / "failed_jobs.yaml"
    context = multiprocessing.get_context("fork")
    start = context.Barrier(8)
    workers = [
        context.Process(target=_record_failures, args=(str(path), worker, start))
        for worker in range(8)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    entries = OmegaConf.to_container(OmegaConf.load(path))
    assert sorted((e["job"], e["entry"]) for e in entries) == [
        (job, entry) for job in range(8) for entry in range(5)
    ]
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [path.name]
