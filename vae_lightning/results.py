"""The results table of finished runs: ``python -m vae_lightning.results FOLDER [FOLDER ...]``.

For every run folder (a folder given, or the job folders of a sweep folder given), evaluates its
best checkpoint with ``vae_lightning.evaluate`` into ``<run>/evaluation`` (kept: a later call
reuses it; without the prior-sampling estimate, which the table does not show), then writes
``results.md`` and ``results.csv``: test ELBO and IWAE bits/dim (and which kind), FID of each
sampler's images and of reconstructions against the training and the test images (with the
floors under the table), PSNR, SSIM, active units, parameters, training time and the hardware
it trained on.
"""

import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from vae_lightning.cli import argument_parser, one_line_errors
from vae_lightning.files import read_run_file, write_table
from vae_lightning.launch.run_files import NOT_RESULT_SETTINGS, RunFilesNotFoundError, threads
from vae_lightning.training.checkpoint_format import val_bpd_scores
from vae_lightning.training.checkpoints import load_model, read_checkpoint

COLUMNS = {
    "run": "run",
    "elbo_bpd": "test ELBO bpd",
    "iwae_bpd": "test IWAE bpd",
    "bpd_kind": "bpd is",
    "num_samples": "K",
    "fid_num_images": "FID N",
    "psnr": "PSNR",
    "ssim": "SSIM",
    "active_units": "active units",
    "num_params": "params (M)",
    "fit_minutes": "train time (min)",
    "hardware": "trained on",
}


def is_run_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def run_folders(paths: list[Path]) -> list[Path]:
    """The run folders among ``paths`` and their sub-folders (the jobs of a sweep)."""
    runs = []
    for path in paths:
        found = [path] if is_run_folder(path) else sorted(filter(is_run_folder, path.glob("*")))
        if not found:
            raise RunFilesNotFoundError(
                f"{path} is no run folder (config.yaml and checkpoints/) and holds none: give "
                "outputs/runs/<date>/<time> or a sweep's outputs/multiruns/<date>/<time>"
            )
        runs += found
    return runs


def saved_val_bpd(checkpoint: Path) -> float | None:
    """The val/bpd at which a ``ModelCheckpoint`` monitoring it saved ``checkpoint``, if any."""
    saved = read_checkpoint(checkpoint, "checkpoint", mmap=True)
    return min(val_bpd_scores(saved, "current_score"), default=None)


def best_checkpoint(run: Path) -> Path:
    """The kept checkpoint with the lowest val/bpd (several are kept with ``save_top_k`` > 1),
    else ``last.ckpt``, else the one kept."""
    kept = sorted(p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    scored = [(bpd, path) for path in kept if (bpd := saved_val_bpd(path)) is not None]
    last = run / "checkpoints" / "last.ckpt"
    if scored:
        return min(scored)[1]
    if last.is_file():
        return last
    if kept:
        return kept[0]
    raise RunFilesNotFoundError(f"{run}/checkpoints holds no checkpoint: did the run finish?")


def evaluation(run: Path, num_samples: int, overrides: list[str], again: bool) -> dict[str, Any]:
    """``eval.json`` of the run's best checkpoint, computed unless it is there already."""
    folder = run / "evaluation"
    results = folder / "eval.json"
    if again or not results.is_file():
        command = [
            sys.executable,
            "-m",
            "vae_lightning.evaluate",
            f"ckpt_path={best_checkpoint(run)}",
            f"eval.num_samples={num_samples}",
            "eval.prior_sampling=false",
            f"hydra.run.dir={folder}",
            *overrides,
        ]
        print(f"Evaluating {run} ...", file=sys.stderr)
        code = subprocess.run(command, stdout=subprocess.DEVNULL).returncode
        if code != 0:
            raise RunFilesNotFoundError(f"the evaluation of {run} failed: {_failure(code)}")
    return read_run_file(results)


def _failure(code: int) -> str:
    """Why a subprocess with return ``code`` stopped, for a user."""
    if code == -signal.SIGKILL:
        return (
            "it was killed (SIGKILL), most often for want of memory: lower eval.max_batch "
            "(--set eval.max_batch=1024)"
        )
    if code < 0:
        return f"it was stopped by {signal.Signals(-code).name}"
    return f"exit code {code} (its messages are above)"


def _read_json(path: Path) -> dict[str, Any]:
    return read_run_file(path) if path.is_file() else {}


def run_name(run: Path) -> str:
    """The run's overrides that change its results (not where the data is, paths or loggers)."""
    overrides_file = run / ".hydra" / "overrides.yaml"
    overrides = read_run_file(overrides_file, list) if overrides_file.is_file() else []
    shown = [o for o in overrides or [] if not o.startswith(NOT_RESULT_SETTINGS)]
    return " ".join(shown) or "(defaults)"


def bpd_kind(run: Path, results: dict[str, Any]) -> str:
    """What the run's bits/dim are (``VAE.bpd_kind``): as its evaluation recorded, or, for an
    evaluation written before it did, as its best checkpoint's likelihood says."""
    if kind := results.get("bpd_kind"):
        return kind
    return load_model(best_checkpoint(run), "checkpoint").vae.bpd_kind


def table_row(
    run: Path, results: dict[str, Any], keys: Iterable[str] | None = None
) -> dict[str, Any]:
    """The run's cells of the table with columns ``keys`` (by default its own)."""
    metrics = _read_json(run / "metrics.json")
    hardware = _read_json(run / "hardware.json")
    row = {key: results.get(key) for key in keys or columns([results])}
    row["run"] = run_name(run)
    row["bpd_kind"] = bpd_kind(run, results)
    params = metrics.get("num_params")
    row["num_params"] = f"{params / 1e6:.2f}" if params else None
    if not metrics:  # train.py writes metrics.json when training has finished
        row["fit_minutes"] = "unfinished"
    elif seconds := metrics.get("fit_seconds"):
        row["fit_minutes"] = f"{seconds / 60:.1f}"
    if hardware:
        device = hardware["device"]
        if device == "CPU":  # with its threads: "x86_64, 2 threads"
            device = f"CPU ({threads(int(hardware['cpu'].split(', ')[-1].split()[0]))})"
        processes = hardware.get("processes", 1)
        row["hardware"] = f"{processes} x {device}" if processes > 1 else device
    return row


SET_NAMES = {"prior": "prior", "gmm": "GMM", "two_stage": "2-stage", "reconstructions": "recon."}
"""How the FID columns name the generated sets of ``vae_lightning.evaluate`` (its samplers, by
their ``sampler`` group names, and reconstructions)."""


def fid_columns(evaluations: list[dict[str, Any]]) -> dict[str, str]:
    """A column per generated set of any evaluation against the training images, then a column
    per set against the test images."""
    sets = list(dict.fromkeys(name for e in evaluations for name in e.get("fid_sets", ())))
    labels = {name: f"FID {SET_NAMES.get(name, name)}" for name in sets}
    return {f"fid_{name}": label for name, label in labels.items()} | {
        f"fid_{name}_test": f"{label} (test)" for name, label in labels.items()
    }


def columns(evaluations: list[dict[str, Any]]) -> dict[str, str]:
    """``COLUMNS`` with the FID columns of ``evaluations`` after K."""
    keys = list(COLUMNS)
    at = keys.index("num_samples") + 1
    return (
        {k: COLUMNS[k] for k in keys[:at]}
        | fid_columns(evaluations)
        | {k: COLUMNS[k] for k in keys[at:]}
    )


def floors(evaluations: list[dict[str, Any]]) -> str:
    """What N real images score against each reference, for each N of ``evaluations``."""
    lines = []
    for n, train, test in sorted(
        {
            (e["fid_num_images"], e["fid_floor"], e["fid_floor_test"])
            for e in evaluations
            if "fid_floor" in e
        }
    ):
        lines.append(
            f"FID floor at N = {n}: {train:.2f} (the test images against the training images), "
            f"{test:.2f} (the first N training images against the test images).\n"
        )
    return "\n" + "".join(lines) if lines else ""


def write_results(
    rows: list[dict[str, Any]], evaluations: list[dict[str, Any]], output_dir: Path
) -> Path:
    """``results.md`` (the table, and the FID floors under it) and ``results.csv`` in
    ``output_dir``."""
    markdown = output_dir / "results.md"
    write_table(rows, markdown, columns(evaluations), digits=3, note=floors(evaluations))
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("vae_lightning.results", __doc__)
    parser.add_argument("folders", type=Path, nargs="+", help="run or sweep folders")
    parser.add_argument(
        "--num-samples",
        type=int,
        default=1000 if torch.cuda.is_available() else 100,
        help="K for the IWAE bound: 1000 on a GPU, 100 on a CPU (here: %(default)s)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for each evaluation (repeat it for more)",
    )
    parser.add_argument("--again", action="store_true", help="evaluate runs evaluated before")
    parser.add_argument("--output-dir", type=Path, help="where the table goes (the first folder)")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error(f"--num-samples={args.num_samples}: it must be at least 1")
    with one_line_errors():
        runs = run_folders(args.folders)
        for run in runs:  # a damaged run folder is named before any evaluation starts
            read_run_file(run / "config.yaml")
            best_checkpoint(run)
        evaluations = [evaluation(run, args.num_samples, args.set, args.again) for run in runs]
        keys = columns(evaluations)
        rows = [table_row(run, e, keys) for run, e in zip(runs, evaluations, strict=True)]
        markdown = write_results(rows, evaluations, args.output_dir or args.folders[0])
    print(markdown.read_text(), end="")
    print(f"\nWrote {markdown} and results.csv")


if __name__ == "__main__":
    main()
