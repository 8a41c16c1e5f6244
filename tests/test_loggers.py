"""W&B chooses its mode without ever prompting: offline unless it has a key and a server."""

import pytest

from vae_lightning import loggers
from vae_lightning.loggers import has_wandb_api_key, resolve_wandb_mode


@pytest.fixture
def no_account(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_no_key_means_offline(no_account):
    assert not has_wandb_api_key()
    mode, reason = resolve_wandb_mode("auto")
    assert mode == "offline" and "API key" in reason


def test_key_from_netrc_and_unreachable_server_means_offline(no_account, monkeypatch):
    no_account.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    no_account.chmod(0o600)
    assert has_wandb_api_key()
    monkeypatch.setattr(loggers, "is_reachable", lambda host: False)
    mode, reason = resolve_wandb_mode("auto")
    assert mode == "offline" and "api.wandb.ai" in reason


def test_key_and_reachable_server_means_online(no_account, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(loggers, "is_reachable", lambda host: True)
    assert resolve_wandb_mode("auto") == ("online", None)


def test_explicit_modes_win(no_account, monkeypatch):
    assert resolve_wandb_mode("disabled") == ("disabled", None)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("online") == ("offline", None)


def test_unreachable_host_is_detected_quickly():
    assert not loggers.is_reachable("127.0.0.1", port=9, timeout=1.0)


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"logger\.wandb\.mode"):
        loggers.wandb_logger(project="p", save_dir=str(tmp_path), mode="sometimes")


@pytest.fixture
def train_dir(tmp_path):
    run = tmp_path / "run"
    (run / "wandb" / "run-20261124_101010-abc123").mkdir(parents=True)
    (run / "config.yaml").write_text(
        "logger:\n  wandb:\n    project: proj\n    name: model.latent_dim=64\n"
        "    group: sweep_2026-11-24_10-10-10.0\n"
    )
    return run


def recorded_init(monkeypatch):
    import wandb

    calls = []
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or "run")
    return calls


def test_eval_resumes_the_online_training_run(train_dir, tmp_path, monkeypatch):
    calls = recorded_init(monkeypatch)
    monkeypatch.setattr(loggers, "resolve_wandb_mode", lambda mode: ("online", None))
    assert loggers.start_eval_run(train_dir, tmp_path / "eval", "auto", {}) == "run"
    assert calls == [{"project": "proj", "id": "abc123", "resume": "allow", "dir": train_dir}]


def test_eval_offline_is_a_new_run_in_the_training_group(train_dir, tmp_path, monkeypatch):
    calls = recorded_init(monkeypatch)
    monkeypatch.setattr(loggers, "resolve_wandb_mode", lambda mode: ("offline", "no API key"))
    loggers.start_eval_run(train_dir, tmp_path / "eval", "auto", {"seed": 0})
    (call,) = calls
    assert call["group"] == "sweep_2026-11-24_10-10-10.0" and call["job_type"] == "eval"
    assert call["name"] == "eval model.latent_dim=64" and call["mode"] == "offline"
    assert "id" not in call


def test_eval_disabled_starts_no_run(train_dir, tmp_path, monkeypatch):
    calls = recorded_init(monkeypatch)
    assert loggers.start_eval_run(train_dir, tmp_path, "disabled", {}) is None
    assert calls == []
