"""Hydra plugins that a command line may name, and the extra that installs each."""

import importlib.util
from collections.abc import Sequence

PLUGINS = {
    "hydra/launcher=submitit_": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib"),
    "hparams_search=optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
}
"""Command-line overrides that need a Hydra plugin: its module and the extra that installs it."""


def check_plugins(args: Sequence[str]) -> None:
    """Exit with the pip command to run if an override names a Hydra plugin that is missing
    (Hydra itself would only say that the config group has no such option)."""
    for arg in args:
        for prefix, (module, extra) in PLUGINS.items():
            if arg.startswith(prefix) and importlib.util.find_spec(module) is None:
                raise SystemExit(
                    f"Error: {arg} needs the {module.split('.')[-1]} plugin, which is not "
                    f'installed: pip install -e ".[{extra}]" (or "vae_lightning[{extra}]").'
                )
