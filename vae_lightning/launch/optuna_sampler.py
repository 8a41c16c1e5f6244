"""Optuna sampler for ``hparams_search=optuna``: a seeded TPE that also works for continued
studies."""

import numpy as np
from optuna.samplers import RandomSampler, TPESampler
from optuna.study import Study
from optuna.trial import FrozenTrial


class ContinuingTPESampler(TPESampler):
    """``TPESampler`` whose random state is seeded with ``seed`` plus the number of trials the
    study held when this search started. A seeded TPE started again on a stored study would
    otherwise replay its first random draws, and so repeat trials already run; this way a
    continued search tries new points and is still reproducible."""

    def __init__(self, seed: int | None = None, **kwargs) -> None:
        super().__init__(seed=seed, **kwargs)
        self._base_seed = seed
        self._seeded_for_study = False

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict:
        if not self._seeded_for_study and self._base_seed is not None:
            earlier = len(study.get_trials(deepcopy=False)) - 1  # all but the one starting
            self._rng = np.random.RandomState(self._base_seed + earlier)
            self._random_sampler = RandomSampler(seed=self._base_seed + earlier)
        self._seeded_for_study = True
        return super().infer_relative_search_space(study, trial)
