"""Plan a store for a cluster: pick k, m and the stripe groups; say what they cost and risk.

:func:`plan` evaluates every layout the store accepts on N nodes (k, m >= 1,
k + m <= 32 and <= N, groups exactly as
:func:`snapstore.control.placement.form_groups` makes them), drops those whose
memory per node exceeds the budget, and picks one. Pure: no Ray, no torch.

Memory per node (what an SMP allocates for one job; G ranks of S bytes on it)
    - data slots: 2 per rank, the committed step and the next: ``2 G S``;
    - parity: each node holds m chunks, each as long as the longest data
      chunk of its stripe (``G`` pieces of ``S / k``, 64-byte aligned), in two
      generations: the committed step's and the one being built (it is
      written beside the committed one, which stays intact until the commit):
      ``2 m G S / k``. ``snapstore.bench.failures`` measured 2.67 x the state
      per node for (3, 1) and 4.0 x for (2, 2), which is ``2 + 2m/k``;
    - XOR deltas: two per rank (by step parity), each the changed bytes of a
      step, kept only while at most half of a rank changed
      (``snapstore.node.store.DELTA_MAX_FRACTION``): ``2 f G S`` for a changed
      fraction f <= 0.5, else 0. The default f = 0.5 is the most they take;
    - persisting (optional): a step being flushed holds its slots, so one
      more slot per rank: ``G S``.
    Manifests and records (kilobytes) are not counted.

Time until a step is protected (a full snapshot, every byte changed)
    staging copy ``S / memcpy`` (ranks copy in parallel) + the home SMP's
    piece checksums ``G S / checksum`` (one core) + parity: each node builds
    its m parity chunks, each from k pieces read from k other nodes, so it
    reads ``m G S`` bytes at the network bandwidth, checks them (inline) and
    encodes them on one core, then checksums its ``m G S / k`` parity + the
    coordinator publishing the record. Deltas only make it faster.

Time to re-protect after a node loss (the window ``w`` of the survival model)
    detection (Ray's death report + ``reprotect_delay``) + rebuilding the lost
    node's ``G S`` bytes onto one node: each of its k chunks is decoded from
    k members of its stripe, so that node reads ``k G S`` bytes (at the
    bandwidth; checked, decoded, the output checksummed) + new parity over
    the re-formed group, as above + publishing.

The constants (:class:`Rates`) are anchored to what this repository
measured (README, docs/performance-*.md) on one core of a 2-vCPU VM:
memcpy 14.3 GB/s, ISA-L encode 0.95-2.2 x memcpy and decode 1.06-2.3 x
(``bench.codec``; the planner takes 1.0 x, the low end), xxh3 about 28 GB/s
(2 x memcpy), publishing a record 5 ms. The network rate is an input: the
repository has no multi-host measurement.

The probability of getting through the horizon without falling back to disk
comes from :mod:`snapstore.ops.survival` (REFT's model of independent node
failures), with the re-protection time above as its window. What neither
models: correlated failures (a rack, a switch, a power feed, a bad software
push), stragglers, GPU memory, a node lost while a step is being protected
(the previous step is still protected), and, for m >= 2, sets of m + 1 lost
nodes of one group that share no stripe (the store survives them when
n > k + m, so the model is conservative there; for m = 1 every pair of nodes
of a group shares a stripe, so the model's loss rule is the store's own).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

from snapstore.coding.isal_engine import guaranteed_invertible
from snapstore.config import StoreConfig, format_size, parse_size
from snapstore.control.placement import form_groups
from snapstore.errors import ConfigError
from snapstore.format.record import ALIGN, piece_len
from snapstore.ops.survival import FailureModel, expected_losses

__all__ = [
    "Candidate",
    "FailureModel",
    "MemoryUse",
    "Plan",
    "PlanRequest",
    "Rates",
    "Recovery",
    "Timing",
    "evaluate",
    "format_plan",
    "make_plan",
    "memory_use",
    "plan",
    "protect_time",
    "reprotect_time",
]

MAX_WIDTH = 32
"""k + m at most (StoreConfig, the codec)."""
DELTA_MAX_FRACTION = 0.5
"""``snapstore.node.store.DELTA_MAX_FRACTION``, copied (tests/test_plan.py checks they agree)."""
GB = 1e9
HOUR = 3600.0
_STORE = StoreConfig()


def _positive(what: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{what}: expected a number, got {value!r}")
    if value <= 0:
        raise ConfigError(f"{what} must be > 0, got {value}")
    return float(value)


DEATH_REPORT_S = 1.0
"""Seconds until Ray reports a dead SMP to the coordinator's watch (a killed process: tens
of milliseconds; a stopped raylet: about a second here)."""


@dataclass(frozen=True)
class Rates:
    """Speeds of the byte work on one node, in GB/s (1e9 bytes/s) or seconds. [defaults]

    network_gbps: what a node sends and receives each way [12.5: 100 Gb/s; an input,
        not measured here].
    memcpy_gbps: one core copying warm memory, also the staging copy per rank
        [14.3: ``np.copyto`` of 256 MiB and 2 GiB in ``bench.save``].
    encode_x, decode_x: RS on one core, data bytes per second / memcpy [1.0:
        ``bench.codec`` measured 0.95-2.2 x and 1.06-2.3 x; the low end].
    checksum_x: xxh3 on one core / memcpy [2.0: about 28 GB/s against 14.3].
    publish_s: the coordinator publishing a step record [0.005: ``bench.save``].
    detect_s: a node's loss until its data is rebuilt elsewhere [Ray reporting the
        SMP's death (``DEATH_REPORT_S``, about 1 s measured here for a node whose
        raylet stops) plus ``reprotect_delay`` of StoreConfig: 3.0].
    """

    network_gbps: float = 12.5
    memcpy_gbps: float = 14.3
    encode_x: float = 1.0
    decode_x: float = 1.0
    checksum_x: float = 2.0
    publish_s: float = 0.005
    detect_s: float = DEATH_REPORT_S + _STORE.reprotect_delay

    def __post_init__(self) -> None:
        _positive("network bandwidth (GB/s, network_gbps)", self.network_gbps)
        _positive("memcpy rate (GB/s, memcpy_gbps)", self.memcpy_gbps)
        for name in ("encode_x", "decode_x", "checksum_x"):
            _positive(name, getattr(self, name))
        for name in ("publish_s", "detect_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")


# -- memory and time of one layout ------------------------------------------------


@dataclass(frozen=True)
class PlanRequest:
    """What the planner is asked: a cluster, a job's state, a budget, a failure model.

    ``state_per_gpu`` is the bytes one rank stores (with data-parallel
    de-duplication, its share); ``memory_budget`` the bytes per node the
    store may use. ``delta_fraction``: the fraction of a rank's bytes that
    change per step, for the XOR deltas' memory (0.5, the default, is the
    most they take). Ties in the choice: plans whose probability of falling
    back to disk is within ``tolerance`` of the best plan's count as equally
    safe, and memory within ``memory_slack`` (a fraction) of the least as
    equally small.
    """

    nodes: int
    gpus_per_node: int
    state_per_gpu: int
    memory_budget: int
    failures: FailureModel
    horizon_hours: float = 720.0
    rates: Rates = field(default_factory=Rates)
    delta_fraction: float = DELTA_MAX_FRACTION
    persisting: bool = False
    tolerance: float = 1e-6
    memory_slack: float = 0.01

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "state_per_gpu", "memory_budget"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.nodes < 2:
            raise ConfigError(
                f"nodes: a store protects a step with k + m >= 2 nodes, got {self.nodes}"
            )
        _positive("horizon (hours)", self.horizon_hours)
        if not 0 <= self.delta_fraction <= 1:
            raise ConfigError(f"delta_fraction must be within 0-1, got {self.delta_fraction}")
        if not 0 <= self.tolerance < 1:
            raise ConfigError(f"tolerance must be within [0, 1), got {self.tolerance}")
        if not 0 <= self.memory_slack < 1:
            raise ConfigError(f"memory_slack must be within [0, 1), got {self.memory_slack}")

    @property
    def node_state(self) -> int:
        """Bytes of state homed on one node: ``gpus_per_node * state_per_gpu``."""
        return self.gpus_per_node * self.state_per_gpu


@dataclass(frozen=True)
class MemoryUse:
    """Bytes one node needs for the job, by kind (see the module docstring)."""

    data_slots: int
    parity: int
    deltas: int
    persisting: int

    @property
    def total(self) -> int:
        return self.data_slots + self.parity + self.deltas + self.persisting


@dataclass(frozen=True)
class Timing:
    """Seconds from a save until its step is protected: the sum of the parts."""

    stage: float
    checksum: float
    parity: float
    publish: float

    @property
    def total(self) -> float:
        return self.stage + self.checksum + self.parity + self.publish


@dataclass(frozen=True)
class Recovery:
    """Seconds from a node's loss until its group is protected again: the sum of the parts."""

    detect: float
    rebuild: float
    parity: float
    publish: float

    @property
    def total(self) -> float:
        return self.detect + self.rebuild + self.parity + self.publish


def memory_use(req: PlanRequest, k: int, m: int) -> MemoryUse:
    """Bytes per node for layout (k, m): the module docstring says what is counted."""
    g, s = req.gpus_per_node, req.state_per_gpu
    chunk = -(-g * piece_len(s, k) // ALIGN) * ALIGN  # the longest data chunk of a stripe
    deltas = 2 * g * int(req.delta_fraction * s) if req.delta_fraction <= DELTA_MAX_FRACTION else 0
    return MemoryUse(2 * g * s, 2 * m * chunk, deltas, g * s if req.persisting else 0)


def _parity_seconds(node_bytes: int, k: int, m: int, r: Rates) -> float:
    read = m * node_bytes  # m chunks, each coded from k pieces of node_bytes / k
    copy = r.memcpy_gbps * GB
    return (
        read / (r.network_gbps * GB)
        + read / (r.checksum_x * copy)
        + read / (r.encode_x * copy)
        + read / k / (r.checksum_x * copy)
    )


def protect_time(req: PlanRequest, k: int, m: int) -> Timing:
    """From a save of a full snapshot until the step is protected (the module docstring)."""
    r, d = req.rates, req.node_state
    copy = r.memcpy_gbps * GB
    return Timing(
        stage=req.state_per_gpu / copy,
        checksum=d / (r.checksum_x * copy),
        parity=_parity_seconds(d, k, m, r),
        publish=r.publish_s,
    )


def reprotect_time(req: PlanRequest, k: int, m: int) -> Recovery:
    """From a node's loss until its group is protected again: the survival model's window."""
    r, d = req.rates, req.node_state
    copy = r.memcpy_gbps * GB
    read = k * d
    rebuild = (
        read / (r.network_gbps * GB)
        + read / (r.checksum_x * copy)
        + read / (r.decode_x * copy)
        + d / (r.checksum_x * copy)
    )
    return Recovery(r.detect_s, rebuild, _parity_seconds(d, k, m, r), r.publish_s)


# -- candidates and the choice ------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One layout evaluated: groups as (nodes, count), memory, times, risk over the horizon."""

    k: int
    m: int
    groups: tuple[tuple[int, int], ...]
    backend: str
    memory: MemoryUse
    overhead: float
    protect: Timing
    reprotect: Recovery
    expected_losses: float
    fits: bool

    @property
    def survival(self) -> float:
        """P(the job gets through the horizon without falling back to disk)."""
        return math.exp(-self.expected_losses)

    @property
    def fallback(self) -> float:
        """1 - survival, without losing digits when it is tiny."""
        return -math.expm1(-self.expected_losses)


@functools.lru_cache(maxsize=4)
def _node_names(nodes: int) -> tuple[str, ...]:
    return tuple(f"node-{i}" for i in range(nodes))


def _group_sizes(nodes: int, k: int, m: int) -> tuple[tuple[int, int], ...]:
    """(size, count) of the groups form_groups makes of ``nodes`` nodes, smallest first."""
    sizes = [len(g) for g in form_groups(_node_names(nodes), k, m)]
    return tuple(sorted((n, sizes.count(n)) for n in set(sizes)))


def evaluate(req: PlanRequest, k: int, m: int) -> Candidate:
    """Layout (k, m) on the request's cluster, whether or not it fits the budget (``fits``).

    Raises ConfigError when the store would refuse it (k, m < 1, k + m > 32
    or more than the nodes).
    """
    StoreConfig(k=k, m=m)  # the store's own checks of k and m
    if k + m > req.nodes:
        raise ConfigError(f"k + m = {k + m} exceeds the {req.nodes} nodes")
    groups = _group_sizes(req.nodes, k, m)
    mem = memory_use(req, k, m)
    recovery = reprotect_time(req, k, m)
    losses = expected_losses(groups, m, recovery.total / HOUR, req.horizon_hours, req.failures)
    vand = guaranteed_invertible("vandermonde", k, m)
    return Candidate(
        k=k,
        m=m,
        groups=groups,
        backend="isa_l_rs_vand" if vand else "isa_l_rs_cauchy",
        memory=mem,
        overhead=mem.total / req.node_state,
        protect=protect_time(req, k, m),
        reprotect=recovery,
        expected_losses=losses,
        fits=mem.total <= req.memory_budget,
    )


@dataclass(frozen=True)
class Plan:
    """Every layout that fits, best first, the chosen one (the first) and why."""

    request: PlanRequest
    candidates: tuple[Candidate, ...]
    chosen: Candidate
    reason: str
    considered: int

    def to_dict(self) -> dict[str, Any]:
        def one(c: Candidate) -> dict[str, Any]:
            d = dataclasses.asdict(c)
            d["memory"]["total"] = c.memory.total
            d["protect"]["total"] = c.protect.total
            d["reprotect"]["total"] = c.reprotect.total
            d["groups"] = [list(g) for g in c.groups]
            d.update(survival=c.survival, fallback=c.fallback)
            return d

        return {
            "request": dataclasses.asdict(self.request),
            "chosen": one(self.chosen),
            "reason": self.reason,
            "considered": self.considered,
            "candidates": [one(c) for c in self.candidates],
        }


def make_plan(req: PlanRequest) -> Plan:
    """Evaluate every layout; choose the safest within the budget (see :func:`plan`)."""
    every = [
        evaluate(req, width - m, m)
        for width in range(2, min(MAX_WIDTH, req.nodes) + 1)
        for m in range(1, width)
    ]
    fits = [c for c in every if c.fits]
    if not fits:
        raise ConfigError(_too_small(req, every))
    best = min(c.fallback for c in fits)
    safe = [c for c in fits if c.fallback - best <= req.tolerance]
    least = min(c.memory.total for c in safe)
    safe_ids = {id(c) for c in safe}
    near = {id(c) for c in safe if c.memory.total <= least * (1 + req.memory_slack)}

    def rank(c: Candidate) -> tuple[Any, ...]:
        if id(c) in near:
            return (0, c.protect.total, c.memory.total, c.reprotect.total, c.k, c.m)
        if id(c) in safe_ids:
            return (1, c.memory.total, c.protect.total, c.reprotect.total, c.k, c.m)
        return (2, c.fallback, c.memory.total, c.protect.total, c.k, c.m)

    ordered = tuple(sorted(fits, key=rank))
    chosen = ordered[0]
    why = (
        f"of the {len(fits)} layouts within the budget ({len(every) - len(fits)} need more), "
        f"{len(safe)} {'is' if len(safe) == 1 else 'are'} as safe as the safest (P(fallback) "
        f"within {req.tolerance:g} of {best:.2g})"
    )
    if len(safe) == 1:
        why += "; it is the only one"
    elif len(near) == 1:
        why += f"; of those it needs the least memory ({format_size(least)} per node)"
    else:
        why += (
            f"; {len(near)} of those need the least memory (within "
            f"{req.memory_slack:.0%} of {format_size(least)} per node), and of those it "
            f"protects a step soonest ({_duration(chosen.protect.total)})"
        )
    return Plan(req, ordered, chosen, why, len(every))


def _too_small(req: PlanRequest, every: list[Candidate]) -> str:
    least = min(every, key=lambda c: (c.memory.total, c.fallback))
    mem = least.memory
    text = (
        f"a memory budget of {format_size(req.memory_budget)} per node fits no layout for "
        f"{format_size(req.node_state)} of state per node: the smallest, k={least.k} "
        f"m={least.m}, needs {format_size(mem.total)} (data slots {format_size(mem.data_slots)}"
        f", parity {format_size(mem.parity)}, deltas {format_size(mem.deltas)}, persisting "
        f"{format_size(mem.persisting)}); raise the budget to at least "
        f"{format_size(mem.total)} ({mem.total} bytes)"
    )
    if mem.deltas:
        text += (
            f", or, if more than half of each rank's bytes change every step (full training: "
            f"no XOR deltas are kept), set the delta fraction to 1 (--delta-fraction 1), which "
            f"needs {format_size(mem.total - mem.deltas)}"
        )
    return text + "; or spread the state over more GPUs"


def plan(
    nodes: int,
    gpus_per_node: int,
    state_per_gpu: int | str,
    node_mtbf_hours: float,
    memory_budget: int | str,
    *,
    bandwidth_gbps: float = Rates.network_gbps,
    horizon_hours: float = 720.0,
    weibull_shape: float = 1.0,
    delta_fraction: float = DELTA_MAX_FRACTION,
    persisting: bool = False,
    memcpy_gbps: float = Rates.memcpy_gbps,
    tolerance: float = 1e-6,
    memory_slack: float = 0.01,
) -> Plan:
    """Pick k, m and the stripe groups for ``nodes`` nodes; sizes as bytes or "80GiB".

    The choice, among the layouts within the memory budget: the highest
    probability of getting through ``horizon_hours`` without falling back to
    disk (plans within ``tolerance`` of it tie), then the least memory per
    node (within ``memory_slack`` of it ties), then the soonest protection.
    Raises ConfigError for bad input, or when no layout fits the budget
    (naming the smallest budget that works). See :class:`PlanRequest`.
    """
    req = PlanRequest(
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        state_per_gpu=parse_size(state_per_gpu, "state per GPU"),
        memory_budget=parse_size(memory_budget, "memory budget"),
        failures=FailureModel(node_mtbf_hours, weibull_shape),
        horizon_hours=horizon_hours,
        rates=Rates(network_gbps=bandwidth_gbps, memcpy_gbps=memcpy_gbps),
        delta_fraction=delta_fraction,
        persisting=persisting,
        tolerance=tolerance,
        memory_slack=memory_slack,
    )
    return make_plan(req)


# -- output -------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.2f} s"
        if seconds < 10
        else f"{seconds:.1f} s"
        if seconds < 600
        else (f"{seconds / 60:.1f} min")
    )


def format_plan(p: Plan, top: int = 10) -> str:
    """The plan as text: the request, the best ``top`` layouts, the choice and why."""
    if top < 1:
        raise ConfigError(f"top: list at least 1 layout, got {top}")
    r = p.request
    lines = [
        f"{r.nodes} nodes x {r.gpus_per_node} GPUs, {format_size(r.state_per_gpu)} per GPU "
        f"({format_size(r.node_state)} per node); budget {format_size(r.memory_budget)} per node",
        f"{r.failures.describe()}; horizon {r.horizon_hours:g} h; network "
        f"{r.rates.network_gbps:g} GB/s, memcpy {r.rates.memcpy_gbps:g} GB/s per node",
        "",
        f"{'k':>3} {'m':>2}  {'groups (count x nodes)':22} {'memory/node':>12} {'x state':>7} "
        f"{'protected':>10} {'re-protect':>10} {'P(fall back to disk)':>20}",
    ]
    for c in p.candidates[:top]:
        groups = " + ".join(f"{count}x{n}" for n, count in c.groups)
        mark = "  <- chosen" if c is p.chosen else ""
        lines.append(
            f"{c.k:>3} {c.m:>2}  {groups:22} {format_size(c.memory.total):>12} "
            f"{c.overhead:>6.2f}x {_duration(c.protect.total):>10} "
            f"{_duration(c.reprotect.total):>10} {c.fallback:>20.2e}{mark}"
        )
    more = len(p.candidates) - top
    if more > 0:
        lines.append(f"  ... {more} more within the budget (--top to see them)")
    c = p.chosen
    lines += [
        "",
        f"chosen: k={c.k} m={c.m}, backend {c.backend}: {p.reason}.",
        f"  memory per node: {format_size(c.memory.total)} = data slots "
        f"{format_size(c.memory.data_slots)} + parity {format_size(c.memory.parity)} + deltas "
        f"{format_size(c.memory.deltas)}"
        + (f" + persisting {format_size(c.memory.persisting)}" if c.memory.persisting else ""),
        f"  protected {_duration(c.protect.total)} after a save (stage "
        f"{_duration(c.protect.stage)}, checksums {_duration(c.protect.checksum)}, parity "
        f"{_duration(c.protect.parity)}); after a node loss, protected again in "
        f"{_duration(c.reprotect.total)} (detect {_duration(c.reprotect.detect)}, rebuild "
        f"{_duration(c.reprotect.rebuild)}, parity {_duration(c.reprotect.parity)})",
        f"  P(no fallback to disk within {r.horizon_hours:g} h) = "
        + (f"{c.survival:.6f}" if c.fallback >= 1e-6 else f"1 - {c.fallback:.2g}"),
        "  start it with: "
        + ("SNAPSTORE_BACKEND=isa_l_rs_cauchy " if c.backend != "isa_l_rs_vand" else "")
        + f"snapstore up --k {c.k} --m {c.m} --memory-per-node {_size_arg(r.memory_budget)}",
    ]
    return "\n".join(lines)


def _size_arg(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)
