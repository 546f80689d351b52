"""Which sampled parameters explain validation accuracy and peak memory: Optuna's fANOVA on the study."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ips_search.experiment import MEMORY_METRIC, METRIC

MIN_IMPORTANCE_TRIALS = 5
COLUMNS = ["parameter", "target", "importance"]


def param_importances(study, min_trials: int = MIN_IMPORTANCE_TRIALS, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """Optuna's fANOVA importances of the sampled parameters, for validation accuracy and for peak memory.

    Returns ``(table, note)``: ``table`` has columns ``parameter, target, importance``
    (empty when they can't be computed) and ``note`` says why in words (or is empty).
    Uses COMPLETE trials of the study (early-stopped trials are PRUNED there);
    parameters with a single value are left out (nothing to attribute).
    """
    import optuna
    from optuna.trial import TrialState

    if study is None:
        return pd.DataFrame(columns=COLUMNS), "no Optuna study (optuna.journal) in the experiment"
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(trials) < min_trials:
        return pd.DataFrame(columns=COLUMNS), (
            f"parameter importance needs at least {min_trials} finished trials in the Optuna study; "
            f"it has {len(trials)}"
        )
    names = sorted({p for t in trials for p in t.params})
    params = [p for p in names if len({repr(t.params.get(p)) for t in trials}) > 1]
    targets = {
        METRIC: lambda t: t.values[0],
        MEMORY_METRIC: lambda t: float(t.user_attrs.get(MEMORY_METRIC, math.nan)),
    }
    rows, notes = [], []
    for target, fn in targets.items():
        values = np.array([fn(t) for t in trials], dtype=float)
        usable = [t for t, v in zip(trials, values, strict=True) if np.isfinite(v)]
        spread = values[np.isfinite(values)]
        if len(usable) < min_trials or not params:
            notes.append(f"{target}: too few trials with a finite value or no varied parameter")
            continue
        if np.ptp(spread) == 0:
            notes.append(f"{target}: every trial has the same value, so no parameter explains it")
            continue
        sub = optuna.create_study(directions=["maximize"])
        sub.add_trials(
            [optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=fn(t)) for t in usable]
        )
        try:
            found = optuna.importance.get_param_importances(
                sub, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed), params=params
            )
        except (RuntimeError, ValueError) as exc:  # e.g. zero variance in every tree
            notes.append(f"{target}: Optuna could not compute importances ({exc})")
            continue
        rows += [{"parameter": p, "target": target, "importance": float(v)} for p, v in found.items()]
    return pd.DataFrame(rows, columns=COLUMNS), "; ".join(notes)
