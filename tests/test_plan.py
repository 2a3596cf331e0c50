"""The planner (snapstore.ops.plan) and its survival model (snapstore.ops.survival).

The analytic survival probability is held against a seeded Monte-Carlo
simulation of the same model, within four standard errors, for exponential
and Weibull lifetimes, small and large clusters, one and two parity chunks,
and probabilities near 0, near 1 and in between; one test shows that a wrong
formula would fall outside that band. No cluster: everything here is pure.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import pathlib
import re
from itertools import combinations
from typing import Any

import pytest

import snapstore
from snapstore.cli import main
from snapstore.config import StoreConfig, parse_size
from snapstore.control.placement import form_groups, stripe_members
from snapstore.errors import ConfigError
from snapstore.ops import plan as planner
from snapstore.ops.plan import PlanRequest, Rates, evaluate, memory_use
from snapstore.ops.survival import (
    FailureModel,
    Simulation,
    expected_losses,
    simulate_survival,
    survival_probability,
)

# name: (groups as (size, count), m, window h, horizon h, failures, trials)
CASES: dict[str, tuple[list[tuple[int, int]], int, float, float, FailureModel, int]] = {
    "exponential, 8 nodes, mid": ([(4, 2)], 1, 0.2, 1250, FailureModel(100), 4000),
    "exponential, 8 nodes, near 1": ([(4, 2)], 1, 0.05, 300, FailureModel(100), 20000),
    "exponential, 64 nodes, near 0": ([(4, 16)], 1, 0.2, 750, FailureModel(100), 1000),
    "exponential, 1030 nodes in groups of 4 and 5": (
        [(4, 255), (5, 2)],
        1,
        0.1,
        50,
        FailureModel(100),
        1000,
    ),
    "exponential, m = 2": ([(6, 1)], 2, 1.0, 5000, FailureModel(100), 2000),
    "Weibull 0.7 (infant mortality)": ([(4, 2)], 1, 0.2, 750, FailureModel(100, 0.7), 4000),
    "Weibull 2 (wear-out)": ([(4, 2)], 1, 0.2, 750, FailureModel(100, 2.0), 4000),
    "Weibull 0.5, 32 nodes": ([(4, 8)], 1, 0.05, 500, FailureModel(100, 0.5), 2000),
}


@functools.cache
def _simulated(name: str) -> Simulation:
    groups, m, window, horizon, failures, trials = CASES[name]
    return simulate_survival(groups, m, window, horizon, failures, trials=trials, seed=7)


def _band(probability: float, trials: int) -> float:
    """Four standard errors of a simulated probability, taken at the analytic value."""
    return 4 * math.sqrt(probability * (1 - probability) / trials)


@pytest.mark.parametrize("name", list(CASES))
def test_analytic_survival_matches_the_simulation(name: str) -> None:
    groups, m, window, horizon, failures, trials = CASES[name]
    analytic = survival_probability(groups, m, window, horizon, failures)
    sim = _simulated(name)
    assert abs(sim.probability - analytic) <= _band(analytic, trials), (
        f"{name}: analytic {analytic:.4f}, simulated {sim.probability:.4f} "
        f"+- {sim.stderr:.4f} over {trials} trials"
    )


def test_the_cases_cover_both_ends() -> None:
    def analytic(name: str) -> float:
        groups, m, window, horizon, failures, _ = CASES[name]
        return survival_probability(groups, m, window, horizon, failures)

    assert analytic("exponential, 8 nodes, near 1") > 0.95
    assert analytic("exponential, 64 nodes, near 0") < 0.1
    assert 0.3 < analytic("exponential, 8 nodes, mid") < 0.7


def test_a_wrong_formula_falls_outside_the_band() -> None:
    name = "exponential, 8 nodes, mid"
    groups, m, window, horizon, failures, trials = CASES[name]
    sim = _simulated(name)
    wrong = {
        "window 1.5 x too long": survival_probability(groups, m, 1.5 * window, horizon, failures),
        "groups one node larger": survival_probability([(5, 2)], m, window, horizon, failures),
    }
    for what, p in wrong.items():
        assert abs(sim.probability - p) > _band(p, trials), what


def test_rare_losses_follow_the_raid_mttdl() -> None:
    """Exponential lifetimes, w << MTBF: E = H / MTTDL, MTTDL = 1 / (n C(n-1,m) l^(m+1) w^m)."""
    mtbf, window, horizon = 5000.0, 60 / 3600, 720.0
    lam = 1 / mtbf
    for n, m in [(4, 1), (8, 2), (13, 3)]:
        mttdl = 1 / (n * math.comb(n - 1, m) * lam ** (m + 1) * window**m)
        got = expected_losses([(n, 1)], m, window, horizon, FailureModel(mtbf))
        assert got == pytest.approx(horizon / mttdl, rel=1e-3)


def test_numerical_renewal_agrees_with_the_exponential_closed_form() -> None:
    # A shape a hair off 1 takes the numerical (Weibull) path.
    for groups, m, window, horizon in [([(4, 3)], 1, 0.2, 1250.0), ([(7, 1)], 2, 0.01, 720.0)]:
        exact = expected_losses(groups, m, window, horizon, FailureModel(100))
        numerical = expected_losses(groups, m, window, horizon, FailureModel(100, 1 + 1e-9))
        assert numerical == pytest.approx(exact, rel=2e-3)


def test_survival_falls_with_the_window_the_horizon_and_the_failure_rate() -> None:
    base = survival_probability([(4, 8)], 1, 0.05, 500, FailureModel(100))
    assert survival_probability([(4, 8)], 1, 0.1, 500, FailureModel(100)) < base
    assert survival_probability([(4, 8)], 1, 0.05, 1000, FailureModel(100)) < base
    assert survival_probability([(4, 8)], 1, 0.05, 500, FailureModel(50)) < base
    assert survival_probability([(4, 8)], 2, 0.05, 500, FailureModel(100)) > base


# -- the store's rules, as the planner uses them ------------------------------------

REQ: dict[str, Any] = {
    "nodes": 40,
    "gpus_per_node": 4,
    "state_per_gpu": "2GiB",
    "node_mtbf_hours": 2000,
    "memory_budget": "30GiB",
}


def test_every_listed_layout_fits_and_is_one_the_store_accepts() -> None:
    p = planner.plan(**REQ)
    budget = parse_size(REQ["memory_budget"])
    names = [f"n{i}" for i in range(REQ["nodes"])]
    assert p.considered == sum(w - 1 for w in range(2, 33))
    assert 0 < len(p.candidates) < p.considered
    for c in p.candidates:
        assert c.fits and c.memory.total <= budget
        assert c.k >= 1 and c.m >= 1 and c.k + c.m <= 32
        StoreConfig(k=c.k, m=c.m)
        sizes = sorted(len(g) for g in form_groups(names, c.k, c.m))
        assert [n for n, count in c.groups for _ in range(count)] == sizes
        assert all(c.k + c.m <= n < 2 * (c.k + c.m) for n in sizes)
    listed = {(c.k, c.m) for c in p.candidates}
    left_out = [(w - m, m) for w in range(2, 33) for m in range(1, w) if (w - m, m) not in listed]
    assert left_out
    for k, m in left_out:
        assert evaluate(p.request, k, m).memory.total > budget


def test_few_nodes_limit_the_stripe_width() -> None:
    p = planner.plan(**dict(REQ, nodes=5, memory_budget="64GiB"))
    assert p.considered == sum(w - 1 for w in range(2, 6))
    assert max(c.k + c.m for c in p.candidates) == 5


def test_memory_counts_what_the_store_allocates() -> None:
    state = 16 << 20

    def req(**kw: Any) -> PlanRequest:
        kw.setdefault("delta_fraction", 1.0)
        return PlanRequest(4, 1, state, 1 << 40, FailureModel(1000), **kw)

    # bench.failures measured memory per node 43.5M and 65.3M for 16.3M of
    # state per rank (no deltas: every byte changed): (3, 1) and (2, 2).
    assert memory_use(req(), 3, 1).total / state == pytest.approx(43.5 / 16.3, rel=0.01)
    assert memory_use(req(), 2, 2).total / state == pytest.approx(65.3 / 16.3, rel=0.01)
    mem = memory_use(req(delta_fraction=0.3, persisting=True), 3, 1)
    assert (mem.data_slots, mem.deltas, mem.persisting) == (2 * state, 2 * int(0.3 * state), state)
    assert memory_use(req(delta_fraction=0.5), 3, 1).deltas == state  # the most deltas take
    assert memory_use(req(delta_fraction=0.51), 3, 1).deltas == 0  # no deltas kept at all


def test_constants_agree_with_the_store() -> None:
    smp = pathlib.Path(snapstore.__file__).parent / "node" / "store.py"
    values = {
        node.targets[0].id: node.value.value
        for node in ast.parse(smp.read_text()).body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Constant)
    }
    assert values["DELTA_MAX_FRACTION"] == planner.DELTA_MAX_FRACTION
    cfg = StoreConfig()
    assert Rates().detect_s == planner.DEATH_REPORT_S + cfg.reprotect_delay


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_with_one_parity_chunk_every_pair_of_a_group_shares_a_stripe(k: int) -> None:
    """So for m = 1 'more than m of a group down' is exactly when the store loses data."""
    for n in range(k + 1, 2 * (k + 1)):
        group = [f"n{i}" for i in range(n)]
        stripes = [{mb.node for mb in stripe_members(group, s, k, 1)} for s in range(n)]
        for a, b in combinations(group, 2):
            assert any(a in s and b in s for s in stripes), (k, n, a, b)


def test_with_two_parity_chunks_the_group_rule_is_conservative() -> None:
    group = [f"n{i}" for i in range(7)]  # k = 2, m = 2: groups of 4-7
    stripes = [{mb.node for mb in stripe_members(group, s, 2, 2)} for s in range(7)]
    apart = [t for t in combinations(group, 3) if not any(set(t) <= s for s in stripes)]
    assert apart  # three lost nodes that no stripe holds together: the store survives them


def test_layouts_vandermonde_cannot_decode_use_cauchy() -> None:
    req = planner.plan(**dict(REQ, memory_budget="1TiB")).request
    assert evaluate(req, 6, 5).backend == "isa_l_rs_cauchy"
    assert evaluate(req, 3, 1).backend == "isa_l_rs_vand"


# -- the choice ---------------------------------------------------------------------


def test_the_choice_is_the_soonest_protected_of_the_smallest_of_the_safest() -> None:
    p = planner.plan(**REQ)
    best = min(c.fallback for c in p.candidates)
    safe = [c for c in p.candidates if c.fallback - best <= 1e-6]
    least = min(c.memory.total for c in safe)
    near = [c for c in safe if c.memory.total <= least * 1.01]
    assert len(safe) > len(near) > 1  # the ties are real in this case
    assert p.chosen is p.candidates[0]
    assert p.chosen in near
    assert p.chosen.protect.total == min(c.protect.total for c in near)
    assert p.chosen.fallback > best  # it gave up a little safety for memory
    assert "as safe as the safest" in p.reason and "protects a step soonest" in p.reason


def test_without_tolerances_the_safest_wins() -> None:
    p = planner.plan(**REQ, tolerance=0, memory_slack=0)
    assert p.chosen.fallback == min(c.fallback for c in p.candidates)


def test_a_bigger_budget_never_chooses_a_less_safe_plan() -> None:
    small = planner.plan(**dict(REQ, memory_budget="26GiB"), tolerance=0)
    large = planner.plan(**dict(REQ, memory_budget="40GiB"), tolerance=0)
    assert large.chosen.fallback <= small.chosen.fallback


# -- bad input ----------------------------------------------------------------------


def test_a_budget_too_small_names_the_smallest_budget_that_works() -> None:
    with pytest.raises(ConfigError, match="raise the budget to at least") as err:
        planner.plan(**dict(REQ, memory_budget="10GiB"))
    found = re.search(r"\((\d+) bytes\)", str(err.value))
    assert found is not None
    needed = int(found.group(1))
    assert planner.plan(**dict(REQ, memory_budget=needed)).chosen.memory.total <= needed
    with pytest.raises(ConfigError, match="fits no layout"):
        planner.plan(**dict(REQ, memory_budget=needed - 1))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"nodes": 1}, "nodes"),
        ({"gpus_per_node": 0}, "gpus_per_node"),
        ({"state_per_gpu": "ten GiB"}, "state per GPU"),
        ({"memory_budget": -1}, "memory budget"),
        ({"node_mtbf_hours": -5}, "MTBF"),
        ({"weibull_shape": 0.2}, "Weibull shape"),
        ({"horizon_hours": 0}, "horizon"),
        ({"delta_fraction": 1.5}, "delta_fraction"),
        ({"bandwidth_gbps": 0}, "network bandwidth"),
        ({"tolerance": -1}, "tolerance"),
    ],
)
def test_bad_input_is_named(change: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        planner.plan(**{**REQ, **change})


def test_simulation_refuses_more_failures_than_it_can_hold() -> None:
    with pytest.raises(ConfigError, match="fewer trials"):
        simulate_survival([(4, 1000)], 1, 0.1, 1e5, FailureModel(100), trials=1000, seed=0)


# -- the command line and the Python entry point ----------------------------------

ARGV = [
    "plan",
    "--nodes",
    "40",
    "--gpus-per-node",
    "4",
    "--state-per-gpu",
    "2GiB",
    "--node-mtbf",
    "2000",
    "--memory-budget",
    "30GiB",
]


def test_cli_prints_the_top_layouts_and_the_choice(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(ARGV) == 0
    out = capsys.readouterr().out
    chosen = planner.plan(**REQ).chosen
    assert f"chosen: k={chosen.k} m={chosen.m}" in out
    rows = [line for line in out.splitlines() if re.match(r"\s*\d+\s+\d+\s+\d+x\d+", line)]
    assert len(rows) == 10
    assert rows[0].split()[:2] == [str(chosen.k), str(chosen.m)]
    assert rows[0].endswith("<- chosen")
    assert f"snapstore up --k {chosen.k} --m {chosen.m} --memory-per-node 30GiB" in out


def test_cli_json_for_scripts(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*ARGV, "--json", "--weibull-shape", "0.8", "--horizon", "100", "--bandwidth", "25"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    chosen = planner.plan(**REQ, weibull_shape=0.8, horizon_hours=100, bandwidth_gbps=25).chosen
    assert (out["chosen"]["k"], out["chosen"]["m"]) == (chosen.k, chosen.m)
    assert out["chosen"]["fallback"] == pytest.approx(chosen.fallback)
    assert out["request"]["failures"] == {"mtbf_hours": 2000, "shape": 0.8}
    assert out["request"]["rates"]["network_gbps"] == 25
    assert all(c["memory"]["total"] <= parse_size("30GiB") for c in out["candidates"])


def test_cli_budget_too_small_exits_2_and_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*ARGV[:-1], "10GiB"]
    assert main(argv) == 2
    assert "raise the budget to at least" in capsys.readouterr().err


def test_snapstore_plan_is_the_planner() -> None:
    assert snapstore.plan is planner.plan
    assert "plan" in snapstore.__all__
