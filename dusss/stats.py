"""Mean and 95 % t-interval over seeds, alone or of a paired difference between two table rows.

A comparison of two rows is paired: the same seed draws the same data and
labelled subset for every row, so the seed-to-seed spread they share cancels
in the per-seed differences. :func:`paired_difference` matches two rows' runs
by seed and gives the mean difference with the Student t-interval of the
differences; :func:`t_interval` is the same interval for one set of values
(e.g. one row's Dice over seeds).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd

__all__ = ["LEVEL", "t_interval", "paired_difference"]

LEVEL = 0.95  # two-sided coverage of every interval the project reports


def t_interval(values: Iterable[float], level: float = LEVEL) -> dict[str, float]:
    """Mean of ``values`` and its two-sided t-interval: ``mean``, ``ci_low``, ``ci_high``, ``half_width``, ``n``.

    ``half_width = t.ppf((1 + level) / 2, n - 1) * sd / sqrt(n)`` with ``sd``
    the sample standard deviation (ddof=1); NaN values are dropped first. The
    interval is NaN below two values and the mean NaN with none.
    """
    from scipy.stats import t

    x = np.asarray([v for v in values if not pd.isna(v)], dtype=float)
    n = int(x.size)
    mean = float(x.mean()) if n else math.nan
    half = float(t.ppf((1 + level) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "half_width": half, "n": n}


def _by_seed(x: pd.Series | pd.DataFrame) -> pd.Series:
    """Test Dice in points indexed by seed: a Series as it is, a runs frame (:mod:`dusss.experiments.tables`) x 100."""
    if isinstance(x, pd.DataFrame):
        missing = {"seed", "test_dice"} - set(x.columns)
        if missing:
            raise ValueError(f"a runs frame needs the columns 'seed' and 'test_dice' (of load_runs); it lacks "
                             f"{sorted(missing)}")
        x = pd.Series(100 * x["test_dice"].to_numpy(dtype=float), index=x["seed"].to_numpy())
    x = x.dropna()
    twice = sorted(set(x.index[x.index.duplicated()]))
    if twice:
        raise ValueError(f"seeds {twice} appear more than once in one row's runs; pass one run per seed "
                         f"(one row, one label share, one data set)")
    return x


def paired_difference(a: pd.Series | pd.DataFrame, b: pd.Series | pd.DataFrame,
                      level: float = LEVEL) -> dict[str, object]:
    """Test Dice of ``a`` minus ``b`` over the seeds both have: mean and Student t-interval of the per-seed differences.

    ``a`` and ``b`` are one row's runs each: a Series of Dice in points
    indexed by seed, or rows of :func:`dusss.experiments.tables.load_runs` (``seed``,
    ``test_dice`` in [0, 1], converted to points). Only seeds present in both
    count. Returns ``mean``, ``ci_low``, ``ci_high``, ``half_width``
    (:func:`t_interval` of the differences, ddof=1; NaN interval below two
    pairs), ``n_pairs`` and ``seeds`` (the sorted seeds used).
    """
    a, b = _by_seed(a), _by_seed(b)
    seeds = sorted(set(a.index) & set(b.index))
    out = t_interval(a.loc[seeds].to_numpy() - b.loc[seeds].to_numpy(), level)
    return {"mean": out["mean"], "ci_low": out["ci_low"], "ci_high": out["ci_high"],
            "half_width": out["half_width"], "n_pairs": out["n"], "seeds": [int(s) for s in seeds]}
