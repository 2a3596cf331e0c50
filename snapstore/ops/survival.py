"""How likely a job gets through a horizon without falling back to disk: analytic and simulated.

The failure model follows REFT ("Reliable and Efficient In-Memory Fault
Tolerance of Large Language Model Pretraining", arXiv:2310.12670): nodes
fail independently, with exponential or Weibull lifetimes, and an
erasure-coded group of n nodes loses its snapshot when more than m of its
nodes are down at once; the job survives when every group does.
Evaluated in fixed windows of length w, that model is the binomial
``P(group ok) = sum_{i<=m} C(n,i) p^i (1-p)^(n-i)``, ``p = F(w)``, per
window and group.

Failures arrive at any time, not on window boundaries, so
:func:`expected_losses` counts, over the horizon H, the moments a group
*enters* loss: a node fails while exactly m others of its group are within
their re-protection window w (a node is *down* for w after it fails; a
failed node is replaced at once by a new one, so each node position is a
renewal process). With D(t) the probability that a node is down at t and
nu(t) the rate at which a node that is not down fails::

    E_g = n * integral_0^H nu(t) * C(n-1, m) D(t)^m (1 - D(t))^(n-1-m) dt
    P(survive H) = exp(-sum over groups of E_g)

For exponential lifetimes (rate lambda) and t >= w, D = 1 - e^(-lambda w) and
nu = lambda e^(-lambda w), so E_g ~ n C(n-1, m) lambda^(m+1) w^m H: the
classic mean time to data loss of RAID with m parity disks and repair time w
("A Case for Redundant Arrays of Inexpensive Disks", 1988),
MTTDL = 1 / (n C(n-1,m) lambda^(m+1) w^m).
For Weibull lifetimes every node starts new (age 0) with the horizon, and D
and nu come from the renewal function, solved numerically. The Poisson step
(exp of the expected count) holds while n w / MTBF is small; when it is not,
losses cluster and the formula errs low, on the safe side.

:func:`simulate_survival` draws the same model (seeded numpy) and counts lost
trials; the tests hold the two against each other.

Pure: no Ray, no torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from snapstore.errors import ConfigError

__all__ = [
    "FailureModel",
    "Groups",
    "Simulation",
    "expected_losses",
    "simulate_survival",
    "survival_probability",
]

Groups = Sequence[tuple[int, int]]
"""Stripe groups as (nodes in the group, how many such groups)."""
_F64 = npt.NDArray[np.float64]


def _positive(what: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{what}: expected a number, got {value!r}")
    if value <= 0:
        raise ConfigError(f"{what} must be > 0, got {value}")
    return float(value)


@dataclass(frozen=True)
class FailureModel:
    """Independent node lifetimes: Weibull of ``shape`` (1 = exponential), mean ``mtbf_hours``.

    Each node position is a renewal process: every node is new (age 0) when
    the horizon starts, and a failed node is replaced at once by a new one.
    With shape 1 age does not matter; below 1 new nodes fail more often
    (infant mortality), above 1 less (wear-out). Shapes 0.5-10 are accepted:
    below 0.5 the renewal density is singular at 0 and the numerical solution
    is no longer checked.
    """

    mtbf_hours: float
    shape: float = 1.0

    def __post_init__(self) -> None:
        _positive("node MTBF (hours)", self.mtbf_hours)
        _positive("Weibull shape", self.shape)
        if not 0.5 <= self.shape <= 10:
            raise ConfigError(
                f"Weibull shape must be within 0.5-10 (1 = exponential), got {self.shape}"
            )

    @property
    def exponential(self) -> bool:
        return self.shape == 1.0

    @property
    def scale_hours(self) -> float:
        """Weibull scale eta, so that the mean lifetime is ``mtbf_hours``."""
        return self.mtbf_hours / math.gamma(1.0 + 1.0 / self.shape)

    def cumulative_hazard(self, t: Any) -> _F64:
        return np.asarray((np.maximum(t, 0.0) / self.scale_hours) ** self.shape, dtype=np.float64)

    def cdf(self, t: Any) -> _F64:
        return np.asarray(-np.expm1(-self.cumulative_hazard(t)), dtype=np.float64)

    def sample(self, rng: np.random.Generator, count: int) -> _F64:
        if self.exponential:
            return rng.exponential(self.mtbf_hours, count)
        return self.scale_hours * rng.weibull(self.shape, count)

    def describe(self) -> str:
        if self.exponential:
            return f"exponential lifetimes, node MTBF {self.mtbf_hours:g} h"
        return (
            f"Weibull lifetimes (shape {self.shape:g}, new nodes), node MTBF {self.mtbf_hours:g} h"
        )


# -- survival, analytic -----------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _renewal_excess(failures: FailureModel, horizon: float) -> tuple[_F64, _F64]:
    """Grid t over [0, horizon] and R(t) = U(t) - F(t): expected failures after the first.

    Solves U = F + F * U (Stieltjes convolution) on the grid; within cell j
    of the convolution U(t - s) is taken at the mean s of F's mass in the
    cell, from F's power law near 0 (a Riemann-Stieltjes scheme with that weight):
    accurate to ~1e-3 for shapes >= 0.5.
    """
    cells = int(min(8000, max(2000, math.ceil(60 * horizon / failures.scale_hours))))
    t = np.linspace(0.0, horizon, cells + 1)
    b = failures.shape
    big_f = failures.cdf(t)
    d_f = np.diff(big_f, prepend=0.0)
    lo, hi = t[:-1], t[1:]
    mean_s = b / (b + 1) * (hi ** (b + 1) - lo ** (b + 1)) / (hi**b - lo**b)
    theta = np.concatenate([[0.0], (mean_s - lo) / (hi - lo)])
    near, far = d_f * (1 - theta), d_f * theta
    u = np.zeros(cells + 1)
    r = np.zeros(cells + 1)
    for i in range(1, cells + 1):
        s = far[1] * u[i - 1] + near[1] * big_f[i]
        if i >= 2:
            s += np.dot(near[2 : i + 1], u[i - 1 : 0 : -1]) + np.dot(far[2 : i + 1], u[i - 2 :: -1])
        r[i] = s / (1 - near[1])
        u[i] = big_f[i] + r[i]
    return t, r


def _expected_entries(n: int, m: int, window: float, horizon: float, f: FailureModel) -> float:
    """E_g of the module docstring: times a group of n nodes enters loss within the horizon."""
    if n <= m:
        return 0.0
    c = math.comb(n - 1, m)
    if f.exponential:
        lam = 1.0 / f.mtbf_hours
        early = min(window, horizon)
        ts = (np.arange(64) + 0.5) * early / 64
        d = -np.expm1(-lam * ts)
        first = (
            float(np.sum(lam * np.exp(-lam * ts) * c * d**m * (1 - d) ** (n - 1 - m))) * early / 64
        )
        d_w = -math.expm1(-lam * window)
        late = max(horizon - window, 0.0) * lam * math.exp(-lam * window)
        return n * (first + late * c * d_w**m * (1 - d_w) ** (n - 1 - m))
    grid, excess = _renewal_excess(f, horizon)

    def big_r(x: _F64) -> _F64:
        return np.asarray(np.interp(x, grid, excess, left=0.0), dtype=np.float64)

    lo = min(window, horizon) * 1e-4
    t = np.unique(
        np.clip(
            np.concatenate(
                [
                    np.linspace(0.0, horizon, 401),
                    np.geomspace(lo, horizon, 600),
                    window + np.geomspace(lo, horizon, 400),
                    [window],
                ]
            ),
            0.0,
            horizon,
        )
    )
    a, b = t[:-1], t[1:]
    mid = 0.5 * (a + b)
    d_first = f.cdf(b) - f.cdf(a)
    d_all = d_first + big_r(b) - big_r(a)
    ages = (np.arange(64) + 0.5) * window / 64
    mean_survival = float(np.mean(np.exp(-f.cumulative_hazard(ages))))
    survive_window = float(np.exp(-f.cumulative_hazard(window)))
    late = mid >= window
    # nu: failures of a node that is not down, i.e. whose previous failure
    # (if any) is over w ago; before w only first failures qualify.
    nu = np.where(late, d_all * survive_window, d_first)
    before = mid - window
    in_window = np.exp(-f.cumulative_hazard(before)) * -np.expm1(
        -(f.cumulative_hazard(mid) - f.cumulative_hazard(before))
    )
    # D: a failure within (t - w, t] (its replacement surviving to t); before
    # w, any failure by t, which is the first one: F(t).
    down = np.where(
        late, (in_window + big_r(mid) - big_r(np.maximum(before, 0.0))) * mean_survival, f.cdf(mid)
    )
    down = np.clip(down, 0.0, 1.0)
    return n * float(np.sum(nu * c * down**m * (1 - down) ** (n - 1 - m)))


def expected_losses(
    groups: Groups, m: int, window_hours: float, horizon_hours: float, failures: FailureModel
) -> float:
    """Expected number of times some group enters loss within the horizon (sum of E_g)."""
    _check_model(groups, m, window_hours, horizon_hours)
    return sum(
        count * _expected_entries(n, m, window_hours, horizon_hours, failures)
        for n, count in groups
    )


def survival_probability(
    groups: Groups, m: int, window_hours: float, horizon_hours: float, failures: FailureModel
) -> float:
    """P(no group has more than m nodes down at once within the horizon); see the module doc."""
    return math.exp(-expected_losses(groups, m, window_hours, horizon_hours, failures))


def _check_model(groups: Groups, m: int, window: float, horizon: float) -> None:
    if not groups or any(n < 1 or c < 1 for n, c in groups):
        raise ConfigError(f"groups: expected (size >= 1, count >= 1) pairs, got {list(groups)}")
    if m < 1:
        raise ConfigError(f"m must be >= 1, got {m}")
    _positive("re-protection window (hours)", window)
    _positive("horizon (hours)", horizon)


# -- survival, simulated ------------------------------------------------------------


@dataclass(frozen=True)
class Simulation:
    """Monte-Carlo estimate of the survival probability: ``survived`` of ``trials``."""

    trials: int
    survived: int

    @property
    def probability(self) -> float:
        return self.survived / self.trials

    @property
    def stderr(self) -> float:
        p = self.probability
        return math.sqrt(p * (1 - p) / self.trials)


def simulate_survival(
    groups: Groups,
    m: int,
    window_hours: float,
    horizon_hours: float,
    failures: FailureModel,
    *,
    trials: int,
    seed: int,
    max_events: int = 20_000_000,
) -> Simulation:
    """Simulate the model of :func:`survival_probability`, ``trials`` times (seeded).

    Every node position draws lifetimes until the horizon; a failure at t
    marks its position down over [t, t + w). A trial is lost when, at some
    failure, more than m distinct positions of one group are down. Raises
    ConfigError when the trials would draw more than ``max_events`` failures.
    """
    _check_model(groups, m, window_hours, horizon_hours)
    if trials < 1:
        raise ConfigError(f"trials must be >= 1, got {trials}")
    group_of = np.concatenate(
        [np.full(n, g) for g, n in enumerate(n for n, count in groups for _ in range(count))]
    )
    nodes = group_of.size
    expected = trials * nodes * (horizon_hours / failures.mtbf_hours + 1)
    if expected > max_events:
        raise ConfigError(
            f"{trials} trials of {nodes} nodes over {horizon_hours:g} h would draw about "
            f"{expected:.3g} failures (limit {max_events}); use fewer trials or nodes"
        )
    rng = np.random.default_rng(seed)
    slot = np.arange(trials * nodes)
    when = failures.sample(rng, slot.size)
    slots, times = [], []
    while slot.size:
        keep = when < horizon_hours
        slot, when = slot[keep], when[keep]
        slots.append(slot)
        times.append(when)
        when = when + failures.sample(rng, slot.size)
    every, at = np.concatenate(slots), np.concatenate(times)
    trial, pos = every // nodes, every % nodes
    key = trial * (int(group_of.max()) + 1) + group_of[pos]
    order = np.lexsort((at, key))
    key, at, pos, trial = key[order], at[order], pos[order], trial[order]
    # Positions down at each failure: earlier failures of its group within w.
    index = np.arange(at.size)
    columns = [pos]
    back = 1
    while True:
        prev = np.maximum(index - back, 0)
        inside = (index >= back) & (key[prev] == key) & (at - at[prev] < window_hours)
        if not inside.any():
            break
        columns.append(np.where(inside, pos[prev], -back - 1))  # unique filler when outside
        back += 1
    table = np.sort(np.column_stack(columns), axis=1)
    first = table >= 0
    first[:, 1:] &= table[:, 1:] != table[:, :-1]
    lost = np.zeros(trials, dtype=bool)
    lost[trial[first.sum(axis=1) > m]] = True
    return Simulation(trials, int(trials - lost.sum()))
