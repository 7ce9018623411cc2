"""Statistics over seeds for the result tables (ASSUMPTIONS.md W13): confidence intervals, paired
comparisons with CMT-KD, the Holm correction and the "not converged" rule.

- a cell's spread: mean ± the half-width of the two-sided 95 % Student-t interval over its seeds,
  t(0.975, n − 1) · s / √n (s: sample standard deviation); one seed: no interval;
- two independent sets of seeds (a rerun against a reference, workflow/scripts/reference_check.py):
  Welch's interval of the difference of means, or the prediction interval of one new value;
- a method against the reference: the differences method − reference of the seeds both have
  (paired by seed), their 95 % t interval and a two-sided paired t-test (``scipy.stats.ttest_rel``);
  the p-values of one table are Holm-adjusted together and a verdict is read off at ALPHA;
- a run is "not converged" when its best-so-far validation top-1 still rose by at least
  CONVERGENCE_GAIN_PP percentage points over the last 20 % of its epochs (its "gain"); a table cell
  is marked not converged when the mean gain of its runs reaches CONVERGENCE_GAIN_PP
  (CONVERGENCE_SCOPE "cell", the default) or when any one of its runs does ("run").

Pure functions of numbers: no file is read here, and nothing imports torch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05  # family-wise error rate of one table's comparisons (Holm)
CONVERGENCE_GAIN_PP = 1.0  # best validation top-1 still rising by this much (points) = not converged
LAST_FRACTION = 0.2  # ... over this final share of the epochs
# "cell": a cell is marked when the mean gain of its runs reaches CONVERGENCE_GAIN_PP (the rise of
# the mean best-so-far curve: the number the table reports); "run": when any one run's gain does.
# ASSUMPTIONS.md W13 says why "cell" is the default.
CONVERGENCE_SCOPES = ("cell", "run")
CONVERGENCE_SCOPE = "cell"
VAL_COLUMN = "val_top1_student"  # history.csv: validation top-1 of the selected (student) network
DECIMALS = 9  # accuracies differ from their float sum/difference by ~1e-14: round that noise away


@dataclass(frozen=True)
class Spread:
    """Mean of n values with the half-width of its 95 % t interval (NaN for n < 2) and the sample std."""

    mean: float
    ci95: float
    std: float
    n: int


def t_half_width(std: float, n: int, confidence: float = CONFIDENCE) -> float:
    """Half-width of the two-sided Student-t interval of a mean of n values with sample std ``std``."""
    if n < 2 or math.isnan(std):
        return math.nan
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n))


def spread(values: Sequence[float]) -> Spread:
    """Mean ± 95 % t half-width over seeds; identical values give exactly 0 (not a rounding residue)."""
    data = np.asarray([v for v in values if not pd.isna(v)], dtype=float)
    n = len(data)
    if n == 0:
        return Spread(math.nan, math.nan, math.nan, 0)
    if n == 1:
        return Spread(float(data[0]), math.nan, math.nan, 1)
    std = 0.0 if np.all(data == data[0]) else float(np.std(data, ddof=1))
    return Spread(float(np.mean(data)), t_half_width(std, n), std, n)


def prediction_half_width(std: float, n: int, confidence: float = CONFIDENCE) -> float:
    """Half-width of the two-sided Student-t prediction interval of ONE new value from the population
    of n values with sample std ``std``: t(0.5 + confidence / 2, n − 1) · s · √(1 + 1/n)."""
    if n < 2 or math.isnan(std):
        return math.nan
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * std * math.sqrt(1 + 1 / n))


def welch_half_width(a: Spread, b: Spread, confidence: float = CONFIDENCE) -> float:
    """Half-width of Welch's two-sided t interval of mean(b) − mean(a) (unequal variances,
    Welch–Satterthwaite degrees of freedom); 0 when neither sample varies, NaN below 2 values a side."""
    if a.n < 2 or b.n < 2:
        return math.nan
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    if va + vb == 0:
        return 0.0
    df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    return float(stats.t.ppf(0.5 + confidence / 2, df) * math.sqrt(va + vb))


@dataclass(frozen=True)
class Paired:
    """method − reference over the seeds both have: mean, 95 % t half-width, std, pairs, raw p."""

    mean: float
    ci95: float
    std: float
    n_pairs: int
    p_value: float


def paired_difference(method: dict[int, float], reference: dict[int, float]) -> Paired:
    """Differences method − reference paired by seed (``{seed: top1}``; seeds only one side has are
    dropped) with a two-sided paired t-test. All differences equal: p = 1 if they are zero (a tie)
    and p = 0 if not (no spread to doubt the sign), where the t statistic itself is 0/0 or ±inf."""
    seeds = sorted(set(method) & set(reference))
    diffs = np.round([method[s] - reference[s] for s in seeds], DECIMALS)
    n = len(diffs)
    if n == 0:
        return Paired(math.nan, math.nan, math.nan, 0, math.nan)
    if n == 1:
        return Paired(float(diffs[0]), math.nan, math.nan, 1, math.nan)
    if np.all(diffs == diffs[0]):
        return Paired(float(diffs[0]), 0.0, 0.0, n, 1.0 if diffs[0] == 0 else 0.0)
    p = stats.ttest_rel([method[s] for s in seeds], [reference[s] for s in seeds]).pvalue
    std = float(np.std(diffs, ddof=1))
    return Paired(float(np.mean(diffs)), t_half_width(std, n), std, n, float(p))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family: the non-NaN entries; NaN stays NaN).

    Sorted ascending p(1) <= ... <= p(m): adjusted p(i) = max over j <= i of min(1, (m − j + 1) p(j)),
    so an adjusted p-value below alpha is Holm's rejection at family-wise level alpha."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    if m == 0:
        return adjusted
    order = tested[np.argsort(p[tested], kind="stable")]
    steps = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(steps)
    return adjusted


def verdict(mean_difference: float, n_pairs: int, p_adjusted: float, alpha: float = ALPHA) -> str:
    """'better' / 'worse' (than the reference) when the Holm-adjusted p is below alpha, otherwise
    'no significant difference'; 'too few seeds' below two pairs."""
    if n_pairs < 2 or math.isnan(p_adjusted):
        return "too few seeds"
    if p_adjusted < alpha:
        return "better" if mean_difference > 0 else "worse"
    return "no significant difference"


def not_converged(converged: pd.Series) -> pd.Series:
    """True where a run is known not to have converged (runs.csv ``converged`` is False; empty = unknown)."""
    return converged.map(lambda value: value is False or str(value).strip().lower() == "false")


def gains(runs: pd.DataFrame) -> pd.Series:
    """The runs' ``val_gain_last20`` as numbers, NaN where unknown (or all NaN without the column)."""
    if "val_gain_last20" not in runs:
        return pd.Series(math.nan, index=runs.index, dtype=float)
    return pd.to_numeric(runs["val_gain_last20"], errors="coerce").astype(float)


def cell_mark(gain_mean: float, any_not_converged: bool, scope: str | None = None) -> bool:
    """Whether a table cell is marked not converged, from the mean of its runs' known gains (NaN when
    none is known) and whether any of its runs has ``converged`` false. ``scope`` (default: this
    module's CONVERGENCE_SCOPE, read at call time) "cell": the mean gain, rounded to DECIMALS, is at
    least CONVERGENCE_GAIN_PP, or, with no gain known (imported results may carry only ``converged``),
    some run is not converged; "run": some run is not converged. Runs without a gain in a cell where
    others have one do not count under "cell" (the workflow writes both columns from the same history)."""
    scope = scope or CONVERGENCE_SCOPE
    if scope not in CONVERGENCE_SCOPES:
        raise ValueError(f"convergence scope {scope!r}: expected one of {', '.join(CONVERGENCE_SCOPES)}")
    if scope == "run" or pd.isna(gain_mean):
        return bool(any_not_converged)
    return round(float(gain_mean), DECIMALS) >= CONVERGENCE_GAIN_PP


class CellConvergence(NamedTuple):
    n_not_converged: int  # runs with ``converged`` false
    val_gain_mean: float  # mean of the known gains (NaN when none is known)
    not_converged: bool  # the cell's mark (cell_mark)


def cell_convergence(runs: pd.DataFrame, scope: str | None = None) -> CellConvergence:
    """The convergence columns of a table cell from its runs' rows (runs.csv columns
    ``val_gain_last20`` and ``converged``; either may be missing)."""
    n = int(not_converged(runs["converged"]).sum()) if "converged" in runs else 0
    gain_mean = float(gains(runs).mean())
    return CellConvergence(n, gain_mean, cell_mark(gain_mean, n > 0, scope))


def cell_not_converged(runs: pd.DataFrame, scope: str | None = None) -> bool:
    """cell_mark of a cell given its runs' rows (cell_convergence)."""
    return cell_convergence(runs, scope).not_converged


def convergence(history: pd.DataFrame, val_column: str = VAL_COLUMN) -> tuple[float, bool | None]:
    """(gain, converged) of one run from its history.csv rows (columns ``epoch`` and ``val_column``).

    gain = best-so-far validation top-1 at the last epoch E minus at epoch k, in points, with
    k = ceil(0.8 E) for E >= 5 (the last 20 % of the epochs: E = 10 compares epoch 10 with epoch 8).
    For 2 <= E < 5 ceil(0.8 E) would be E itself, so k = E − 1: the last epoch against the one
    before. The run is converged when gain < CONVERGENCE_GAIN_PP (rounded to DECIMALS first, so a
    rise of 70.3 − 69.3 counts as 1.0). Unknown (NaN, None) for a single epoch or without a
    validation column (no validation split): such runs are never marked."""
    if val_column not in history or len(history) < 2:
        return math.nan, None
    val = history.sort_values("epoch")[val_column].to_numpy(dtype=float)
    best = pd.Series(val).cummax().ffill().to_numpy()  # an epoch without a value keeps the best
    epochs = len(val)
    reference_epoch = min(math.ceil(round((1 - LAST_FRACTION) * epochs, DECIMALS)), epochs - 1)
    gain = round(float(best[-1] - best[reference_epoch - 1]), DECIMALS)
    if math.isnan(gain):
        return math.nan, None
    return gain, bool(gain < CONVERGENCE_GAIN_PP)
