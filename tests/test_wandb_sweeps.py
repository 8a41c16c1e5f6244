"""W&B Sweeps driving Hydra: the shipped sweep definitions compose into valid configs, and a run
started the way ``wandb agent`` starts it (its command and environment built by wandb's own
agent code) logs into the agent's run, all without a W&B server."""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from wandb import wandb_agent

from tests.helpers import (
    SHORT,
    cli_env,
    composed,
    offline_wandb_run,
    resolved,
    single_run,
    wandb_start_times_out,
)
from vae_lightning.cli import CONFIG_DIR
from vae_lightning.config import validate_config

SWEEPS = sorted((Path(CONFIG_DIR) / "wandb_sweep").glob("*.yaml"))
ARGS = "${args_no_hyphens}"  # the agent's parameters as name=value: Hydra overrides


def sweep_definition(name: str) -> dict:
    return yaml.safe_load((Path(CONFIG_DIR) / "wandb_sweep" / f"{name}.yaml").read_text())


def parameter_values(spec: dict) -> list:
    """The values a sweep parameter can take: its list, or the ends of its range."""
    return spec["values"] if "values" in spec else [spec["min"], spec["max"]]


def sweep_points(parameters: dict) -> list[dict]:
    """Every value of each parameter (the others at their first), and every combination of the
    config groups (where settings can clash), the plain keys at each end of their values."""
    first = {name: parameter_values(spec)[0] for name, spec in parameters.items()}
    points = [first | {n: v} for n, spec in parameters.items() for v in parameter_values(spec)]
    groups = [name for name in parameters if "/" in name]
    for end in (0, -1):
        plain = {n: parameter_values(s)[end] for n, s in parameters.items() if "/" not in n}
        for values in itertools.product(*(parameters[g]["values"] for g in groups)):
            points.append(plain | dict(zip(groups, values, strict=True)))
    return points


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_sweep_point_composes_into_a_valid_config(sweep_file):
    sweep = sweep_definition(sweep_file.stem)
    assert sweep["metric"] == {"name": "val/bpd_best", "goal": "minimize"}
    assert sweep["command"] == ["${env}", "python", "-m", "vae_lightning.train", ARGS]
    for point in sweep_points(sweep["parameters"]):
        cfg = composed(*(f"{name}={value}" for name, value in point.items()), hydra=True)
        validate_config(cfg)
        for name, value in point.items():
            if "/" in name:  # a config group: its file was chosen
                assert cfg.hydra.runtime.choices[name] == value
            else:
                assert OmegaConf.select(cfg, name) == pytest.approx(value), name


def test_bayes_sweep_stops_weak_runs_early_on_a_metric_logged_every_epoch():
    sweep = sweep_definition("bayes")
    assert sweep["method"] == "bayes" and sweep["early_terminate"]["type"] == "hyperband"


class StartedProcess:
    """Stands in for the agent's child process: the test starts the command itself."""

    def __init__(self, command=None, env=None, **_):
        StartedProcess.command, StartedProcess.env = command, env


def agent_child(tmp_path: Path, monkeypatch, parameters: dict) -> tuple[list[str], dict]:
    """The command line and the W&B environment ``wandb agent`` gives the run it starts for
    sweep ``sweep1``, run ``run42`` and ``parameters``, from wandb's own agent code."""
    for name in ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setattr(wandb_agent, "AgentProcess", StartedProcess)
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sweep1")
    agent._sweep_command = sweep_definition("grid")["command"]
    args = {name: {"value": value} for name, value in parameters.items()}
    agent._command_run({"run_id": "run42", "program": None, "args": args})
    env = {k: v for k, v in StartedProcess.env.items() if k.startswith("WANDB_")}
    return StartedProcess.command, env


def run_agent_command(
    command: list[str], env: dict[str, str], args: list[str], cwd: Path
) -> subprocess.CompletedProcess:
    """The agent's ``command`` with this interpreter, ``args`` added, in the agent's ``env``."""
    proc = subprocess.run(
        [sys.executable, *command[2:], *args],
        cwd=cwd,
        env=cli_env(cwd) | env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.cli
def test_a_run_started_by_a_sweep_agent_logs_into_the_agents_run(cifar_dir, tmp_path, monkeypatch):
    command, env = agent_child(tmp_path, monkeypatch, {"model.latent_dim": 8, "model/arch": "mlp"})
    assert command == [
        "/usr/bin/env",
        "python",
        "-m",
        "vae_lightning.train",
        "model.latent_dim=8",
        "model/arch=mlp",
    ]
    assert env["WANDB_RUN_ID"] == "run42" and Path(env["WANDB_SWEEP_PARAM_PATH"]).is_file()
    # the user has no W&B account here: the run trains, logs offline, and says why the sweep
    # will not hear of it
    proc = run_agent_command(command, env, [f"data.data_dir={cifar_dir}", *SHORT], tmp_path)
    assert "belongs to sweep sweep1, and a sweep needs W&B online" in proc.stdout + proc.stderr
    run = single_run(tmp_path)
    assert resolved(run)["model"]["latent_dim"] == 8  # a plain key and a group reached Hydra
    assert resolved(run)["model"]["arch"]["encoder"]["_target_"].endswith("MLPEncoder")
    (wandb_run,) = tmp_path.glob("**/offline-run-*")  # one W&B run: the agent's
    assert wandb_run.name.endswith("-run42") and wandb_run.parent == run / "wandb"
    recorded = offline_wandb_run(wandb_run)
    assert recorded["run"].run_id == "run42" and recorded["run"].sweep_id == "sweep1"
    assert recorded["run"].display_name == "" and recorded["run"].run_group == ""  # the sweep's
    config = recorded["config"]
    assert config["model.latent_dim"] == 8 and config["model/arch"] == "mlp"  # the agent's
    assert config["model.arch.encoder._target_"].endswith("MLPEncoder")  # the composed config
    assert recorded["summary"]["val/bpd_best"] > 0  # the metric the sweep minimizes


@pytest.mark.cli
def test_a_sweep_run_whose_wandb_start_times_out_keeps_the_agents_run_id(
    cifar_dir, tmp_path, monkeypatch
):
    command, env = agent_child(tmp_path, monkeypatch, {"model.latent_dim": 8})
    args = [f"data.data_dir={cifar_dir}", *SHORT, *wandb_start_times_out()]
    proc = run_agent_command(command, env, args, tmp_path)
    output = proc.stdout + proc.stderr
    assert "W&B: logging failed (CommError('Run initialization has timed out" in output
    assert "run run42 continues offline" in output
    run = single_run(tmp_path)
    (wandb_run,) = tmp_path.glob("**/offline-run-*")  # the fallback's, under the agent's id
    assert (
        wandb_run.name.endswith("-run42") and wandb_run.parent == run / "wandb_fallback" / "wandb"
    )
    recorded = offline_wandb_run(wandb_run)
    assert recorded["run"].run_id == "run42" and recorded["run"].sweep_id == "sweep1"
    assert recorded["summary"]["val/bpd_best"] > 0
