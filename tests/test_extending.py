"""The extension example of docs/development.md, as a researcher meets it: its files written
from the docs into a folder of their own, its distribution checked against torch's, and its
commands run: a sweep over the head's setting, then the results table of that sweep."""

import math
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributions import Laplace as TorchLaplace

from tests.helpers import ROOT, SHORT, assert_one_folder_per_job, run_module

DOCS = ROOT / "docs" / "development.md"


def example_files() -> dict[str, str]:
    """The files the docs give in full: a line naming each (`path`:), then its code block."""
    text = DOCS.read_text()
    return dict(re.findall(r"^`([\w./]+)`:\n\n```\w+\n(.*?)^```$", text, re.M | re.S))


def example_commands() -> list[list[str]]:
    """The docs' commands that use the example's config folder or module."""
    text = DOCS.read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```$", text, re.M | re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    return [shlex.split(line) for line in lines if "my_conf" in line or "my_likelihoods" in line]


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("researcher")
    files = example_files()
    assert set(files) == {"my_likelihoods.py", "my_conf/model/likelihood/laplace.yaml"}
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def test_the_example_likelihood_is_the_laplace_density(example, monkeypatch):
    monkeypatch.syspath_prepend(str(example))
    from my_likelihoods import LaplaceLikelihood

    head = LaplaceLikelihood(b=0.07).double()
    out = torch.randn(4, head.out_channels, 32, 32, dtype=torch.float64)
    p = head(out)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    reference = TorchLaplace(torch.sigmoid(out), 0.07)
    torch.testing.assert_close(p.log_prob(x), reference.log_prob(x).flatten(1).sum(1))
    torch.testing.assert_close(p.scale, reference.stddev)
    assert not head.discrete and not p.discrete  # a density: bits/dim add log 256
    draws = torch.stack([p.sample(torch.Generator().manual_seed(s)) for s in range(400)])
    torch.testing.assert_close(draws.mean(0).mean(), p.mean.mean(), atol=2e-3, rtol=0)
    assert draws.std(0).mean().item() == pytest.approx(0.07 * math.sqrt(2), rel=0.02)


@pytest.mark.cli
def test_the_example_trains_in_a_sweep_and_enters_the_results_table(example, cifar_dir):
    train, sweep, results = example_commands()
    assert train[:3] == sweep[:3] == ["python", "-m", "vae_lightning.train"]
    data = [f"data.data_dir={cifar_dir}", "logger=csv", *SHORT]
    first = next(i for i, arg in enumerate(sweep) if "=" in arg)  # Hydra's options come first
    run_module("vae_lightning.train", [*sweep[3:first], *data, *sweep[first:]], cwd=example)
    jobs = assert_one_folder_per_job(example, "model.likelihood.b", ["0.02", "0.1"])
    for job, b in zip(jobs, (0.02, 0.1), strict=True):
        config = yaml.safe_load((job / "config.yaml").read_text())
        head = config["model"]["likelihood"]
        assert head == {"_target_": "my_likelihoods.LaplaceLikelihood", "b": b}
        assert "sigma" not in config["model"]  # a Gaussian head's setting, not this one's

    trust, *command = results
    variable, modules = trust.split("=")
    assert command[:3] == ["python", "-m", "vae_lightning.results"]
    fast = ["--num-samples", "2", "--set", "eval.fid.enabled=false", "--set", "eval.limit=8"]
    proc = run_module(
        "vae_lightning.results",
        [str(jobs[0].parent), *fast],
        cwd=example,
        extra_env={variable: modules},
    )
    rows = proc.stdout.splitlines()[2:4]
    for row, b in zip(rows, ("0.02", "0.1"), strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0].endswith(f"model/likelihood=laplace model.likelihood.b={b}")
        assert cells[3] == "dequantized bound" and math.isfinite(float(cells[1]))
