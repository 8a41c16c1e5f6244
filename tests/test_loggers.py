"""W&B chooses its mode without ever prompting: offline unless it has a key and a server."""

import pytest

from vae_lightning.training import loggers
from vae_lightning.training.loggers import has_wandb_api_key, resolve_wandb_mode


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


@pytest.mark.parametrize("offline_fails_too", [False, True])
def test_wandb_failing_mid_run_goes_offline_and_training_goes_on(
    no_account, cifar_dir, tmp_path, caplog, monkeypatch, offline_fails_too
):
    import lightning as L
    import wandb

    from tests.helpers import ADAM, MLP
    from vae_lightning.data.cifar10 import CIFAR10DataModule
    from vae_lightning.training.lit_module import VAELitModule

    logger = loggers.wandb_logger(project="vae_lightning", save_dir=str(tmp_path), mode="offline")
    first_run = logger.experiment
    if offline_fails_too:
        monkeypatch.setattr(wandb, "init", lambda **kwargs: 1 / 0)

    class NetworkDropsAtStep3(L.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            if trainer.global_step == 3 and logger.experiment is first_run:

                def no_network(*args, **kwargs):
                    raise wandb.errors.CommError("network is unreachable")

                first_run.log = no_network

    seen_by_the_offline_run: list[int] = []

    class RecordOfflineSteps(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            run = logger.experiment
            if run is not first_run and run.summary.get("trainer/global_step") is not None:
                seen_by_the_offline_run.append(run.summary["trainer/global_step"])

        on_train_end = on_train_batch_end

    trainer = L.Trainer(
        max_steps=8,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[NetworkDropsAtStep3(), RecordOfflineSteps()],
    )
    datamodule = CIFAR10DataModule(str(cifar_dir), batch_size=8, num_workers=0, download=False)
    with caplog.at_level("WARNING", logger="vae_lightning.training.loggers"):
        trainer.fit(VAELitModule(MLP, ADAM, latent_dim=4), datamodule=datamodule)
    assert trainer.global_step == 8  # training went on
    warnings = [
        r.getMessage() for r in caplog.records if r.name == "vae_lightning.training.loggers"
    ]
    assert "CommError('network is unreachable')" in warnings[0]
    fallback = tmp_path / "wandb_fallback" / "wandb"
    assert (
        f"continues offline. Upload it later with: wandb sync {fallback}/offline-run-*"
        in (warnings[0])
    )
    if offline_fails_too:
        assert len(warnings) == 2 and "no more W&B logging in this run" in warnings[1]
        return
    assert len(warnings) == 1
    second_run = logger.experiment
    assert second_run is not first_run and second_run.id == first_run.id
    assert second_run.settings.mode == "offline"
    assert seen_by_the_offline_run == [3, 4, 5, 6, 7]  # the failed step's and all later ones
    wandb.finish()
    for folder in (tmp_path / "wandb", fallback):  # both parts of the run, neither overwritten
        (run_dir,) = folder.glob(f"offline-run-*-{first_run.id}")
        assert list(run_dir.glob(f"run-{first_run.id}.wandb"))
