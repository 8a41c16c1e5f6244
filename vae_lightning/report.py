"""Summarize a sweep from disk: ``python -m vae_lightning.report <multirun folder>``.

Writes ``report.md``, ``report.csv`` and one PNG plot per metric and swept parameter (one line per
combination of the other swept parameters, titled with the settings all jobs share) into the
multirun folder, and prints the table. Jobs are compared by ``val/bpd_best``, what sweeps
minimize. When the sweep's jobs logged to W&B, the table (a W&B Table) and the plots also go to a
W&B run of the sweep's group (``--no-wandb``: not).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from vae_lightning.cli import argument_parser, one_line_errors
from vae_lightning.files import read_run_file, write_table
from vae_lightning.launch.run_files import NOT_RESULT_SETTINGS, RunFilesNotFoundError
from vae_lightning.training.lit_module import UNITS
from vae_lightning.training.loggers import choose_wandb_mode

METRICS = (
    "val/bpd_best",
    "val/bpd",
    "val/elbo",
    "val/kl",
    "val/recon_mse",
    "test/bpd",
    "test/elbo",
    "test/kl",
    "test/recon_mse",
)
PLOTTED = ("val/bpd_best", "test/bpd", "test/elbo", "test/kl", "test/recon_mse")
COMPARED_BY = "val/bpd_best"
COSTS = {"num_params": ("params (M)", 1e-6), "fit_seconds": ("train time (min)", 1 / 60)}
"""Per cost metric: its column label and the factor to that label's unit."""


def load_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One dict per job folder: ``job``, ``overrides`` {key: value}, ``metrics`` (may be empty)
    and ``wandb`` (the job's W&B logger settings, None when it did not log to W&B)."""
    jobs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        overrides = {}
        for item in read_run_file(overrides_file, list):
            key, _, value = item.partition("=")
            overrides[key] = yaml.safe_load(value)
        metrics_file = job_dir / "metrics.json"
        metrics = read_run_file(metrics_file) if metrics_file.is_file() else {}
        config_file = job_dir / "config.yaml"
        config = read_run_file(config_file) if config_file.is_file() else {}
        wandb = (config.get("logger") or {}).get("wandb")
        jobs.append(
            {
                "job": job_dir.name,
                "overrides": overrides,
                "metrics": metrics,
                "wandb": wandb,
            }
        )
    return sorted(jobs, key=lambda j: int(j["job"]) if j["job"].isdigit() else j["job"])


def swept_parameters(jobs: list[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs (all of them for a single job)."""
    keys = sorted({k for job in jobs for k in job["overrides"]})
    if len(jobs) < 2:
        return keys
    return [k for k in keys if len({repr(j["overrides"].get(k)) for j in jobs}) > 1]


def table_rows(jobs: list[dict[str, Any]], params: list[str]) -> list[dict[str, Any]]:
    """Per job: its swept parameters, ``METRICS``, then what it cost (``COSTS``)."""
    rows = []
    for job in jobs:
        metrics = job["metrics"]
        costs = {
            label: metrics[key] * scale if key in metrics else None
            for key, (label, scale) in COSTS.items()
        }
        rows.append(
            {"job": job["job"]}
            | {p: job["overrides"].get(p) for p in params}
            | {m: metrics.get(m) for m in METRICS}
            | costs
        )
    return rows


def fixed_settings(jobs: list[dict[str, Any]], params: list[str]) -> str:
    """The overrides every job shares that change results, for the plots' titles."""
    shared = [
        f"{key}={value}"
        for key, value in sorted(jobs[0]["overrides"].items())
        if key not in params
        and not key.startswith(NOT_RESULT_SETTINGS)
        and all(j["overrides"].get(key) == value for j in jobs)
    ]
    return ", ".join(shared) or "defaults"


def best_job(rows: list[dict[str, Any]]) -> str:
    """The line under the table naming the job with the lowest ``COMPARED_BY``."""
    scored = [row for row in rows if row[COMPARED_BY] is not None]
    if not scored:
        return ""
    best = min(scored, key=lambda row: row[COMPARED_BY])
    value = best[COMPARED_BY]
    return f"\nBest by {COMPARED_BY} (what sweeps minimize): job {best['job']}, {value:.4f}.\n"


def axis_label(metric: str) -> str:
    """``val/bpd_best`` -> ``val/bpd_best (bits/dim)``."""
    name = metric.split("/")[-1].removesuffix("_best")
    return f"{metric} ({UNITS[name]})" if name in UNITS else metric


def plot_metric(
    rows: list[dict[str, Any]],
    metric: str,
    param: str,
    others: list[str],
    path: Path,
    title: str = "",
) -> Figure:
    """``metric`` against ``param``, one line per combination of the ``others``; a log axis for
    latent sizes and for values spanning a factor of 8 or more."""
    values = sorted({row[param] for row in rows}, key=lambda v: (isinstance(v, str), v))
    numeric = all(isinstance(v, int | float) for v in values)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for combo in sorted({tuple(row[o] for o in others) for row in rows}, key=repr):
        points = [
            (row[param], row[metric])
            for row in rows
            if tuple(row[o] for o in others) == combo and row[metric] is not None
        ]
        points.sort(key=lambda p: values.index(p[0]))
        xs = [p[0] if numeric else values.index(p[0]) for p in points]
        label = ", ".join(f"{o}={v}" for o, v in zip(others, combo, strict=True)) or None
        ax.plot(xs, [p[1] for p in points], marker="o", label=label)
    spread = numeric and all(v > 0 for v in values) and max(values) / min(values) >= 8
    if spread or (numeric and param.endswith("latent_dim")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [str(v) for v in values])
    if not numeric:
        ax.set_xticks(range(len(values)), [str(v) for v in values])
    ax.set_xlabel(param)
    ax.set_ylabel(axis_label(metric))
    if title:
        ax.set_title(title, fontsize=8)
    if others:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


@dataclass
class Report:
    """A sweep's written report: its jobs, its table's rows and the files holding them."""

    jobs: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    table: Path
    csv: Path
    plots: list[Path]

    @property
    def files(self) -> list[Path]:
        return [self.table, self.csv, *self.plots]


def write_report(sweep_dir: Path, output_dir: Path | None = None) -> Report:
    """Table (Markdown, CSV) and plots for the sweep in ``sweep_dir``."""
    output_dir = output_dir or sweep_dir
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise RunFilesNotFoundError(
            f"{sweep_dir} holds no job folders (<job>/.hydra/overrides.yaml): give the folder "
            "of a sweep, outputs/multiruns/<date>/<time>"
        )
    params = swept_parameters(jobs)
    rows = table_rows(jobs, params)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = Report(jobs, rows, output_dir / "report.md", output_dir / "report.csv", [])
    missing = [j["job"] for j in jobs if not j["metrics"]]
    note = f"\nJobs without metrics.json (failed or unfinished): {', '.join(missing)}\n"
    failures_file = sweep_dir / "failed_jobs.yaml"
    for failure in yaml.safe_load(failures_file.read_text()) if failures_file.is_file() else []:
        note += f"- job {failure['job']}: {failure['error']}\n"
    write_table(rows, report.table, note=best_job(rows) + (note if missing else ""))
    title = fixed_settings(jobs, params)
    for metric in PLOTTED:
        if all(row[metric] is None for row in rows):
            continue
        for param in params:
            path = output_dir / f"{metric.replace('/', '_')}_vs_{param.replace('/', '_')}.png"
            others = [p for p in params if p != param]
            plot_metric(rows, metric, param, others, path, title)
            report.plots.append(path)
    return report


def log_report_to_wandb(report: Report, sweep_dir: Path) -> str | None:
    """Log ``report``'s table and plots to a W&B run in the group of the sweep's W&B runs;
    returns the mode it logged in (online or offline), or None when no job logged to W&B or
    W&B is disabled."""
    settings = next((j["wandb"] for j in report.jobs if j["wandb"]), None)
    if settings is None:
        return None
    mode = choose_wandb_mode(settings.get("mode", "auto"), sweep_dir)
    if mode == "disabled":
        return None
    import wandb

    group = settings.get("group")
    run = wandb.init(
        project=settings.get("project", "vae_lightning"),
        group=group,
        name=f"report {group or sweep_dir.name}",
        job_type="report",
        dir=sweep_dir,
        mode=mode,
    )
    columns = list(report.rows[0])
    table = wandb.Table(
        columns=columns,
        data=[[row[c] for c in columns] for row in report.rows],
        allow_mixed_types=True,
    )
    plots = {f"report/{path.stem}": wandb.Image(str(path)) for path in report.plots}
    run.log({"report/table": table} | plots)
    run.finish()
    return mode


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("vae_lightning.report", __doc__)
    parser.add_argument(
        "sweep_dir",
        type=Path,
        help="a multirun folder: outputs/multiruns/<date>/<time>",
    )
    parser.add_argument("--output-dir", type=Path, help="where the report goes (the sweep folder)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")
    args = parser.parse_args(argv)
    with one_line_errors():
        report = write_report(args.sweep_dir, args.output_dir)
    print(report.table.read_text(), end="")
    print(f"\nWrote {len(report.files)} files to {report.table.parent}")
    if not args.no_wandb and (mode := log_report_to_wandb(report, args.sweep_dir)):
        print(f"Logged the report to W&B ({mode})")


if __name__ == "__main__":
    main()
