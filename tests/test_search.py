"""A seeded Optuna search continued on its stored study tries new points, reproducibly."""

import optuna

from vae_lightning.launch.optuna_sampler import ContinuingTPESampler


def objective(trial: optuna.Trial) -> float:
    return (trial.suggest_float("x", -3, 3) - 1) ** 2 + trial.suggest_int("h", 1, 8)


def search_twice(storage: str) -> list[dict]:
    """3 trials, then the same search started again on the stored study for 3 more."""
    for _ in range(2):
        study = optuna.create_study(
            study_name="s",
            storage=storage,
            sampler=ContinuingTPESampler(seed=7),
            load_if_exists=True,
        )
        study.optimize(objective, n_trials=3)
    return [t.params for t in study.trials]


def test_a_continued_search_tries_new_points_and_is_reproducible(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = search_twice(f"sqlite:///{tmp_path}/a.db")
    assert len(params) == 6
    assert all(p not in params[:3] for p in params[3:])  # no trial of the first run repeated
    assert search_twice(f"sqlite:///{tmp_path}/b.db") == params  # the same seed, the same search


def test_a_plain_seeded_tpe_would_repeat_the_first_trials(tmp_path):
    """Why ContinuingTPESampler exists."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path}/c.db"
    for _ in range(2):
        study = optuna.create_study(
            study_name="s",
            storage=storage,
            sampler=optuna.samplers.TPESampler(seed=7),
            load_if_exists=True,
        )
        study.optimize(objective, n_trials=3)
    params = [t.params for t in study.trials]
    assert params[3:] == params[:3]
