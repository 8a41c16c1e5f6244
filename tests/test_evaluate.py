"""The evaluate and report commands, run as a user runs them."""

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from tests.helpers import (
    composed,
    head_config,
    make_module,
    metrics_csv,
    offline_wandb_run,
    run_module,
    run_train,
    single_run,
)
from vae_lightning import report
from vae_lightning.config import check_resume_checkpoint
from vae_lightning.errors import ConfigError
from vae_lightning.evaluation.feature_networks import FIDNetworkError, build_extractor
from vae_lightning.launch.run_files import RunFilesNotFoundError
from vae_lightning.report import (
    axis_label,
    best_job,
    fixed_settings,
    load_jobs,
    plot_metric,
    swept_parameters,
    table_rows,
    write_report,
)
from vae_lightning.results import (
    best_checkpoint,
    bpd_kind,
    evaluation,
    run_name,
    saved_val_bpd,
    table_row,
)
from vae_lightning.training.checkpoint_format import current_settings
from vae_lightning.training.checkpoints import load_model

pytestmark = pytest.mark.cli

TRAIN = ["logger=csv", "trainer.max_epochs=1", "data.num_workers=0", "data.batch_size=16"]
EVAL = ["eval.limit=16", "eval.num_samples=8", "data.batch_size=8", "eval.grid_points=32"]
LIKELIHOOD_KEYS = {
    "elbo_nats",
    "elbo_bpd",
    "iwae_nats",
    "iwae_bpd",
    "prior_sampling_nats",
    "prior_sampling_bpd",
    "iwae_minus_elbo_nats",
    "iwae_minus_elbo_bpd",
}
QUALITY_KEYS = {"recon_mse", "psnr", "ssim", "active_units", "kl_per_dim", "mu_variance_per_dim"}


@pytest.fixture(scope="module")
def trained_2d(trained_run) -> Path:
    """The last checkpoint of a 1-epoch run with H = 2 (so the grid integral applies)."""
    return trained_run / "checkpoints" / "last.ckpt"


def eval_output(cwd: Path) -> Path:
    (folder,) = cwd.glob("outputs/evals/*/*")
    return folder


def test_evaluate_writes_every_estimate_and_fid_with_a_custom_extractor(
    cifar_dir, trained_2d, tmp_path
):
    extractor = tmp_path / "features.pt"
    torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(3072, 6))).save(str(extractor))
    proc = run_module(
        "vae_lightning.evaluate",
        [
            f"ckpt_path={trained_2d}",
            f"data.data_dir={cifar_dir}",
            *EVAL,
            f"eval.fid.feature_extractor={extractor}",
            f"eval.fid.cache_dir={tmp_path / 'fid'}",
            "logger=wandb",  # the training run logged to CSV only
        ],
        cwd=tmp_path,
    )
    out = eval_output(tmp_path)
    results = json.loads((out / "eval.json").read_text())
    assert LIKELIHOOD_KEYS | QUALITY_KEYS | {"grid_nats", "grid_bpd"} <= set(results)
    sets = ["prior", "gmm", "two_stage", "reconstructions"]
    assert results["fid_sets"] == sets
    for name in sets:
        assert results[f"fid_{name}"] >= 0 and results[f"fid_{name}_test"] >= 0
    assert results["fid_floor"] >= 0 and results["fid_floor_test"] >= 0
    assert results["num_images"] == 16 and results["num_samples"] == 8
    assert results["latent_dim"] == 2 and len(results["kl_per_dim"]) == 2
    assert results["iwae_nats"] >= results["elbo_nats"] - 1.0
    assert results["fid_num_images"] == 16 and results["fid_network"].startswith("torchscript:")
    assert results["fid_reference_images"] == 80  # every training image of the fixture
    assert {p.name for p in (out / "samplers").iterdir()} == {"gmm.pt", "two_stage.pt"}
    bpd = -results["iwae_nats"] / (3072 * 0.6931471805599453) + 8
    assert results["iwae_bpd"] == pytest.approx(bpd)
    grids = ("reconstructions", "samples", "interpolations", "traversals", "samples_gmm")
    for name in (*grids, "samples_two_stage"):
        assert (out / "images" / f"{name}.png").is_file()
    assert "iwae_bpd" in proc.stdout  # the printed table
    assert "Likelihood estimates (K = 8): 16/16 images" in proc.stderr  # one line, not a file
    assert "FID features of two stage: 16/16 images" in proc.stderr
    assert "Sampler gmm: fitted to 72 posteriors" in (out / "evaluate.log").read_text()
    (wandb_run,) = (out / "wandb").glob("offline-run-*")
    summary = offline_wandb_run(wandb_run)["summary"]  # beside the training run's, online
    for key in ("iwae_bpd", "elbo_bpd", "fid_gmm", "fid_reconstructions_test", "psnr"):
        assert summary[f"eval/{key}"] == pytest.approx(results[key]), key


def test_evaluate_refuses_an_unfit_fid_network_file_before_reading_data(trained_2d, tmp_path):
    path = tmp_path / "network.pt"
    torch.jit.script(nn.Linear(10, 6)).save(str(path))
    args = [f"ckpt_path={trained_2d}", f"eval.fid.feature_extractor={path}", "data.data_dir=/no"]
    proc = run_module("vae_lightning.evaluate", args, cwd=tmp_path, expect_ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    message = " does not map 2 images (2, 3, 32, 32) to features (2, d)"
    assert f"Error: eval.fid.feature_extractor={path}{message}" in proc.stderr


def test_a_missing_fid_weights_file_is_named_by_its_setting(tmp_path):
    missing = tmp_path / "default_1.pt"
    with pytest.raises(FIDNetworkError) as err:
        build_extractor("tf_inception", inception_weights=str(missing))
    assert str(err.value) == f"eval.fid.inception_weights={missing}: there is no such file"


def test_evaluate_starts_from_the_training_runs_config(cifar_dir, tmp_path):
    """The data scaling, seed, batch size and W&B settings are the training run's; the command
    line can still change them, with the training keys."""
    train_args = [f"data.data_dir={cifar_dir}", *TRAIN, "model.latent_dim=2"]
    train_args += ["model/likelihood=logistic_mixture", "model.likelihood.num_mixtures=2"]
    run_train([*train_args, "data.dequantize=false", "seed=5"], cwd=tmp_path / "train")
    ckpt = next((tmp_path / "train").glob("outputs/runs/*/*/checkpoints/last.ckpt"))
    args = [f"ckpt_path={ckpt}", "eval.limit=8", "eval.num_samples=2", "eval.grid_points=8"]
    args.append("eval.fid.enabled=false")
    run_module("vae_lightning.evaluate", args, cwd=tmp_path / "plain")
    plain = yaml.safe_load((eval_output(tmp_path / "plain") / "config.yaml").read_text())
    assert plain["data"]["dequantize"] is False and plain["seed"] == 5
    assert plain["data"]["batch_size"] == 16 and plain["data"]["data_dir"] == str(cifar_dir)
    assert plain["logger"].keys() == {"csv"} and plain["model"]["latent_dim"] == 2
    assert plain["trainer"]["accelerator"] == "auto"
    assert plain["model"]["likelihood"] == head_config("logistic_mixture", num_mixtures=2)
    assert not (eval_output(tmp_path / "plain") / "wandb").exists()
    results = json.loads((eval_output(tmp_path / "plain") / "eval.json").read_text())
    for name in ("elbo", "iwae", "grid"):  # a probability of the 8-bit image: no log 256 added
        code_length = -results[f"{name}_nats"] / (3072 * 0.6931471805599453)
        assert results[f"{name}_bpd"] == pytest.approx(code_length)

    moved = tmp_path / "moved"
    shutil.copytree(cifar_dir, moved)
    changed = [f"data.data_dir={moved}", "data.batch_size=4", "seed=1", "trainer.accelerator=cpu"]
    run_module("vae_lightning.evaluate", [*args, *changed], cwd=tmp_path / "changed")
    cfg = yaml.safe_load((eval_output(tmp_path / "changed") / "config.yaml").read_text())
    assert cfg["data"]["data_dir"] == str(moved) and cfg["data"]["batch_size"] == 4
    assert cfg["seed"] == 1 and cfg["trainer"]["accelerator"] == "cpu"
    assert cfg["data"]["dequantize"] is False  # what was not set stays the training run's


def test_evaluate_gives_one_line_for_a_truncated_dataset_also_in_a_sweep(
    cifar_dir, trained_2d, tmp_path
):
    data = tmp_path / "data"
    shutil.copytree(cifar_dir, data)
    batch = data / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:500])
    args = [f"ckpt_path={trained_2d}", f"data.data_dir={data}", *EVAL, "logger=none"]
    proc = run_module("vae_lightning.evaluate", args, cwd=tmp_path / "single", expect_ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"Error: {batch} is not a CIFAR-10 batch" in proc.stderr

    sweep = ["-m", f"data.data_dir={data},{cifar_dir}"]
    args = [f"ckpt_path={trained_2d}", *EVAL, "logger=none", "eval.fid.enabled=false"]
    proc = run_module(
        "vae_lightning.evaluate", [*sweep, *args], tmp_path / "sweep", expect_ok=False
    )
    assert proc.returncode != 0
    (folder,) = (tmp_path / "sweep").glob("outputs/multiruns/*/*")
    failed = yaml.safe_load((folder / "failed_jobs.yaml").read_text())
    assert [f["job"] for f in failed] == [0] and "is not a CIFAR-10 batch" in failed[0]["error"]
    assert (folder / "1" / "eval.json").is_file()  # the next job ran


def test_report_of_a_folder_without_jobs_gives_one_line(tmp_path):
    proc = run_module("vae_lightning.report", [str(tmp_path)], cwd=tmp_path, expect_ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"Error: {tmp_path} holds no job folders" in proc.stderr


def test_evaluate_requires_a_checkpoint(tmp_path):
    proc = run_module("vae_lightning.evaluate", [], cwd=tmp_path, expect_ok=False)
    assert proc.returncode != 0
    assert "ckpt_path is required" in proc.stderr


def test_report_of_a_multirun_comparing_likelihoods(cifar_dir, tmp_path, capsys):
    likelihoods = "model/likelihood=discretized_gaussian,logistic_mixture"
    run_train(["-m", likelihoods, f"data.data_dir={cifar_dir}", *TRAIN], cwd=tmp_path)
    (sweep,) = tmp_path.glob("outputs/multiruns/*/*")
    jobs = load_jobs(sweep)
    kinds = ["discretized_gaussian", "logistic_mixture"]
    assert [j["overrides"]["model/likelihood"] for j in jobs] == kinds
    assert swept_parameters(jobs) == ["model/likelihood"]

    report.main([str(sweep)])  # its command, in this process
    table = (sweep / "report.md").read_text()
    assert table.splitlines()[0].startswith("| job | model/likelihood | val/bpd")
    assert capsys.readouterr().out.startswith(table.splitlines()[0])
    csv_lines = (sweep / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[1].startswith("0,discretized_gaussian,")
    for job, line in zip(jobs, csv_lines[1:], strict=True):
        assert f"{job['metrics']['test/bpd']}" in line
    assert (sweep / "test_bpd_vs_model_likelihood.png").stat().st_size > 1000


def test_report_marks_jobs_without_metrics(tmp_path):
    for job, latent_dim in (("0", 4), ("1", 16)):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(
            f"- model.latent_dim={latent_dim}\n- model/arch=conv\n"
        )
    metrics = {"val/bpd_best": 5.4, "val/bpd": 5.5, "test/bpd": 5.6, "fit_seconds": 90.0}
    (tmp_path / "0" / "metrics.json").write_text(json.dumps(metrics))
    report = write_report(tmp_path)
    assert {p.name for p in report.files} >= {
        "report.md",
        "report.csv",
        "val_bpd_best_vs_model.latent_dim.png",
    }
    table = (tmp_path / "report.md").read_text()
    assert table.startswith("| job | model.latent_dim | val/bpd_best | val/bpd |")
    assert "| 0 | 4 | 5.4000 | 5.5000 |" in table and "| 1.5000 |" in table  # 90 s
    assert "without metrics.json" in table and ": 1" in table


def test_report_compares_by_the_best_val_bpd_with_units_titles_and_a_log_latent_axis(tmp_path):
    jobs = [
        {"job": str(i), "overrides": {"model.latent_dim": h, "seed": 3}, "metrics": m}
        for i, (h, m) in enumerate([(16, {"val/bpd_best": 5.2}), (32, {"val/bpd_best": 5.0})])
    ]
    rows = table_rows(jobs, ["model.latent_dim"])
    assert best_job(rows).strip() == ("Best by val/bpd_best (what sweeps minimize): job 1, 5.0000.")
    figure = plot_metric(
        rows,
        "val/bpd_best",
        "model.latent_dim",
        [],
        tmp_path / "p.png",
        fixed_settings(jobs, ["model.latent_dim"]),
    )
    (axes,) = figure.axes
    assert axes.get_ylabel() == "val/bpd_best (bits/dim)" and axes.get_xscale() == "log"
    assert axes.get_title() == "seed=3"  # what every job shared
    assert axis_label("test/elbo") == "test/elbo (nats/image)"


def test_the_results_table_evaluates_each_run_once(cifar_dir, trained_2d, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_2d.parent.parent, run)
    extractor = tmp_path / "features.pt"
    torch.jit.script(nn.Sequential(nn.Flatten(), nn.Linear(3072, 4))).save(str(extractor))
    overrides = [f"data.data_dir={cifar_dir}", "eval.limit=8", "eval.grid_points=8"]
    overrides += [f"eval.fid.feature_extractor={extractor}", f"eval.fid.cache_dir={tmp_path}/fid"]
    args = [str(run), "--num-samples=3", *[f"--set={o}" for o in overrides]]
    proc = run_module("vae_lightning.results", args, cwd=tmp_path)
    results = json.loads((run / "evaluation" / "eval.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    header, _, row, _, floor = (run / "results.md").read_text().splitlines()
    assert header.startswith(
        "| run | test ELBO bpd | test IWAE bpd | bpd is | K | FID prior | FID GMM | FID 2-stage "
        "| FID recon. | FID prior (test) | FID GMM (test) | FID 2-stage (test) | FID recon. (test) "
        "| FID N |"
    )
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{results['elbo_bpd']:.3f}" and cells[4] == "3"
    assert cells[3] == "dequantized bound"  # a Gaussian decoder's density
    assert "prior_sampling_bpd" not in results  # not in the table, so not computed
    assert cells[5] == f"{results['fid_prior']:.3f}" and cells[13] == "8"
    assert cells[11] == f"{results['fid_two_stage_test']:.3f}"
    assert cells[17] == f"{metrics['num_params'] / 1e6:.2f}"
    assert re.fullmatch(r"CPU \((1 thread|\d+ threads)\)", cells[19]) and "(1 threads)" not in row
    assert floor.startswith(f"FID floor at N = 8: {results['fid_floor']:.2f} (the test images")
    assert "model.latent_dim=2" in cells[0] and "logger" not in cells[0]  # it changes no result
    assert proc.stdout.startswith(header)
    again = run_module("vae_lightning.results", args, cwd=tmp_path)
    assert "Evaluating" not in again.stderr  # the evaluation is reused


def test_a_run_is_named_by_the_overrides_that_change_its_results(tmp_path):
    """Not where its data and outputs are, its loggers, the checkpoint it resumed from, or
    whether it tested at its end."""
    (tmp_path / ".hydra").mkdir()
    overrides = ["experiment=reference/latent_128", "data.data_dir=/d", "logger=csv", "test=true"]
    overrides += ["hydra.run.dir=/r", "ckpt_path=/r/checkpoints/last.ckpt", "model.beta=0.5"]
    (tmp_path / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))
    assert run_name(tmp_path) == "experiment=reference/latent_128 model.beta=0.5"


def test_the_results_table_takes_the_kept_checkpoint_with_the_lowest_val_bpd(cifar_dir, tmp_path):
    """With save_top_k > 1 several are kept; their file names sort by epoch, not by val/bpd."""
    top_k = ["callbacks.model_checkpoint.save_top_k=3", "trainer.max_epochs=3"]
    run_train([f"data.data_dir={cifar_dir}", *TRAIN, *top_k], cwd=tmp_path)
    run = single_run(tmp_path)
    val_bpd = [float(r["val/bpd"]) for r in metrics_csv(run) if r.get("val/bpd")]
    kept = [p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    assert len(val_bpd) == len(kept) == 3
    best = best_checkpoint(run)
    assert best.name.startswith(f"epoch{val_bpd.index(min(val_bpd)):03d}-")
    assert saved_val_bpd(best) == pytest.approx(min(val_bpd))


def test_a_run_whose_training_has_not_finished_is_marked_so(trained_2d, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_2d.parent.parent, run)
    minutes = json.loads((run / "metrics.json").read_text())["fit_seconds"] / 60
    assert table_row(run, {})["fit_minutes"] == f"{minutes:.1f}"
    (run / "metrics.json").unlink()  # as while it trains, or after it was stopped
    assert table_row(run, {})["fit_minutes"] == "unfinished"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("gaussian", "dequantized bound"),
        ("discretized_gaussian", "code length"),
        ("logistic_mixture", "code length"),
    ],
)
def test_the_results_table_says_which_kind_of_bpd_a_run_reports(kind, expected):
    assert make_module(kind=kind).vae.bpd_kind == expected


def test_an_evaluation_that_does_not_name_its_bpd_kind_takes_the_checkpoints(trained_2d, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_2d.parent.parent, run)
    assert bpd_kind(run, {}) == "dequantized bound"  # its Gaussian head, from its checkpoint
    assert bpd_kind(run, {"bpd_kind": "code length"}) == "code length"


def test_a_killed_evaluation_is_named_with_what_to_do(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    for code, expected in ((-9, "lower eval.max_batch"), (-15, "SIGTERM"), (1, "exit code 1")):
        monkeypatch.setattr(
            subprocess, "run", lambda *a, code=code, **k: SimpleNamespace(returncode=code)
        )
        with pytest.raises(RunFilesNotFoundError, match=expected):
            evaluation(run, 10, [], again=False)


def test_a_checkpoint_written_before_heads_had_targets_loads_and_resumes(trained_2d, tmp_path):
    """Older checkpoints chose the head by ``kind``, with sigma and sigma_mode in every model's
    settings: they still load, are compared with a run's settings, and resume."""
    checkpoint = torch.load(trained_2d, weights_only=True)
    settings = checkpoint["hyper_parameters"]
    assert settings.pop("likelihood") == head_config("gaussian")
    settings["likelihood"] = {"kind": "gaussian"}
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    model = load_model(old)
    assert model.vae.likelihood.sigma_mode == "fixed" and model.vae.likelihood.out_channels == 3
    assert check_resume_checkpoint(composed(f"ckpt_path={old}", "model.latent_dim=2")) is None
    settings["sigma_mode"] = "learned"
    torch.save(checkpoint, old)
    with pytest.raises(ConfigError, match=r"model\.sigma_mode: checkpoint learned, this run fixed"):
        check_resume_checkpoint(composed(f"ckpt_path={old}", "model.latent_dim=2"))


def test_older_logistic_mixture_settings_name_its_head():
    old = {"sigma": 0.1, "sigma_mode": "fixed", "likelihood": {"kind": "logistic_mixture"}}
    old |= {"nonfinite_loss": "stop", "skip_grad_norm": None}  # the update guards' now
    assert current_settings(old) == {"likelihood": head_config("logistic_mixture", num_mixtures=10)}
    unknown = {"likelihood": {"kind": "poisson"}}
    assert current_settings(unknown) == unknown  # refused when built: it names no class
