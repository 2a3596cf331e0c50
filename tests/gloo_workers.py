"""Trainer processes for cluster tests: torch.distributed over gloo on loopback, one per rank.

Ranks are forked from a forkserver that has imported torch, DCP and
transformers' GPT-2 once (``preload``), so a rank costs a fork and its own
Ray connection, not a fresh interpreter importing them again. Each rank
reports to a queue as ``(rank, kind, step, payload)``; :class:`Ranks` starts
them, reads their reports, and kills (SIGKILL, by pid) whatever is still
running when it is left.

The models are tiny (a 2-layer GPT-2 with 16-wide embeddings): the tests
check what happens around failures, not training.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import multiprocessing as mp
import os
import queue
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

__all__ = ["PRELOAD", "Ranks", "context", "free_port"]

PRELOAD = [
    "torch",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "transformers.models.gpt2.modeling_gpt2",
    "snapstore.clients.dcp",
]
"""What the forkserver imports once for every rank it forks (the slow imports)."""

_context: Any = None


def context() -> Any:
    """The forkserver context (started on first use, with :data:`PRELOAD` imported)."""
    global _context
    if _context is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _context = ctx
    return _context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Ranks:
    """Processes running ``target(cfg, out)``, one per config; killed on exit if still alive."""

    def __init__(
        self, target: Callable[[dict[str, Any], Any], None], configs: list[dict[str, Any]]
    ) -> None:
        ctx = context()
        self.out = ctx.Queue()
        self.stacks = tempfile.mkdtemp(prefix="ranks-stacks-")
        for cfg in configs:
            cfg.setdefault("stacks", self.stacks)
        self.procs = [ctx.Process(target=target, args=(cfg, self.out)) for cfg in configs]
        self.reports: list[tuple[int, str, int, Any]] = []

    def __enter__(self) -> Ranks:
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        shutil.rmtree(self.stacks, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL every rank still running and reap it."""
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=30)

    def wait(
        self, done: Callable[[list[tuple[int, str, int, Any]]], bool], timeout: float, what: str
    ) -> list[tuple[int, str, int, Any]]:
        """Read reports until ``done(reports)``; fail on a rank's error or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not done(self.reports):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"timed out waiting for {what}; reports: {self.reports}\n"
                    f"stacks of the ranks still running:\n{self.dump_stacks()}"
                )
            try:
                report = self.out.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    raise AssertionError(
                        f"a rank died (exit codes {dead}) waiting for {what}: {self.reports}"
                    ) from None
                continue
            self.reports.append(report)
            if report[1] == "error":
                raise AssertionError(f"rank {report[0]} failed: {report[3]}")
        return self.reports

    def dump_stacks(self) -> str:
        """Every thread's stack of each rank still running (SIGUSR1: see :func:`_setup`)."""
        alive = [(i, p) for i, p in enumerate(self.procs) if p.is_alive() and p.pid]
        for _, p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGUSR1)
        time.sleep(2.0)
        parts = []
        for i, p in alive:
            path = os.path.join(self.stacks, f"{p.pid}.txt")
            try:
                with open(path) as f:
                    parts.append(f"-- process {i} (pid {p.pid}):\n{f.read()[-6000:]}")
            except OSError:
                parts.append(f"-- process {i} (pid {p.pid}): no stacks written")
        return "\n".join(parts)

    def of(self, kind: str) -> dict[tuple[int, int], Any]:
        """(rank, step) -> payload of every report of ``kind`` so far."""
        return {(r, s): p for r, k, s, p in self.reports if k == kind}


# -- what the ranks run (imports inside: the test process need not import them) --------------


def _tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _batch(step: int, rank: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 64, (2, 8), generator=g)


def digest(tree: Any) -> str:
    """sha256 of every tensor (bytes, dtype, shape) and other leaf of a nested state."""
    import torch

    h = hashlib.sha256()

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(obj[k], f"{path}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}/{i}")
        elif isinstance(obj, torch.Tensor):
            if hasattr(obj, "full_tensor"):
                raise TypeError(f"{path}: a DTensor; digest full state dicts")
            t = obj.detach().cpu().contiguous()
            h.update(f"{path}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"{path}={obj!r}".encode())

    walk(tree, "")
    return h.hexdigest()


def _setup(cfg: dict[str, Any]) -> tuple[Any, Any]:
    """Process group and snapstore client of one rank."""
    import datetime

    import torch
    import torch.distributed as dist

    from snapstore.clients import Client

    if cfg.get("stacks"):  # Ranks.dump_stacks: where a rank that hangs is
        stacks = open(os.path.join(cfg["stacks"], f"{os.getpid()}.txt"), "w")  # noqa: SIM115
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    torch.set_num_threads(1)
    rank, world = cfg["rank"], cfg["world"]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{cfg['port']}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    client = Client(cfg["job"], rank, world, rundir=cfg["rundir"], node_id=cfg["node"], timeout=60)
    return dist, client


def _report_error(cfg: dict[str, Any], out: Any, e: BaseException) -> None:
    from snapstore.clients.dcp import snapstore_error

    inner = snapstore_error(e)
    what = f"{type(inner).__name__}: {inner}" if inner is not None else repr(e)
    out.put((cfg["rank"], "error", -1, what[:4000]))


def ddp_gpt2_dcp(cfg: dict[str, Any], out: Any) -> None:
    """GPT-2 under DDP, ``dcp.save`` through SnapstoreWriter every step.

    ``cfg``: rank, world, port, job, rundir, node, steps; ``load``: first
    ``dcp.load`` through SnapstoreReader and go on from the loaded step;
    ``hang_at``: this rank stops inside ``dcp.save`` of that step (in
    write_data, before staging) and waits to be killed. Reports "loaded"
    and "saved" with the digest of the model and optimizer state.
    """
    try:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        from torch.nn.parallel import DistributedDataParallel as DDP

        from snapstore.clients.dcp import SnapstoreReader, SnapstoreWriter

        dist, client = _setup(cfg)
        rank = cfg["rank"]
        torch.manual_seed(0)
        model = _tiny_gpt2()
        # find_unused_parameters=True: default DDP over gloo rebuilds its buckets after
        # the first step, which changes the gradient summation order (not bitwise).
        ddp = DDP(model, find_unused_parameters=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

        def state(step: int) -> dict[str, Any]:
            msd, osd = get_state_dict(model, opt)
            return {"model": msd, "optim": osd, "step": torch.tensor(step)}

        def full() -> dict[str, Any]:
            return {"model": model.state_dict(), "optim": opt.state_dict()}

        start = 0
        if cfg.get("load"):
            live = state(-1)
            dcp.load(live, storage_reader=SnapstoreReader(client))
            set_state_dict(
                model, opt, model_state_dict=live["model"], optim_state_dict=live["optim"]
            )
            start = int(live["step"]) + 1
            out.put((rank, "loaded", start - 1, digest(full())))

        class Hang(SnapstoreWriter):
            def write_data(self, plan: Any, planner: Any) -> Any:
                out.put((rank, "hanging", step, None))
                time.sleep(600)
                raise AssertionError("not killed")

        for step in range(start, cfg["steps"]):
            x = _batch(step, rank)
            ddp(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            hang = step == cfg.get("hang_at")
            writer = Hang(client) if hang else SnapstoreWriter(client)
            dcp.save(state(step), storage_writer=writer)
            out.put((rank, "saved", step, digest(full())))
        client.close()
        dist.destroy_process_group()
        out.put((rank, "done", -1, None))
    except BaseException as e:
        _report_error(cfg, out, e)


def fsdp_gpt2_dcp(cfg: dict[str, Any], out: Any) -> None:
    """GPT-2 sharded with FSDP2 ``fully_shard`` on CPU, ``dcp.save`` every step.

    ``cfg`` as for :func:`ddp_gpt2_dcp` (no ``hang_at``). The digests are of the
    full (gathered) model and optimizer state, the same on every rank whatever
    the world size.
    """
    try:
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
            set_state_dict,
        )
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from snapstore.clients.dcp import SnapstoreReader, SnapstoreWriter

        dist, client = _setup(cfg)
        rank = cfg["rank"]
        torch.manual_seed(0)
        model = _tiny_gpt2()
        mesh = init_device_mesh("cpu", (cfg["world"],))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

        def state(step: int) -> dict[str, Any]:
            msd, osd = get_state_dict(model, opt)
            return {"model": msd, "optim": osd, "step": torch.tensor(step)}

        def full() -> str:
            msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
            return digest({"model": msd, "optim": osd})

        start = 0
        if cfg.get("load"):
            live = state(-1)
            dcp.load(live, storage_reader=SnapstoreReader(client))
            set_state_dict(
                model, opt, model_state_dict=live["model"], optim_state_dict=live["optim"]
            )
            start = int(live["step"]) + 1
            out.put((rank, "loaded", start - 1, full()))
        for step in range(start, cfg["steps"]):
            x = _batch(step, rank)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            dcp.save(state(step), storage_writer=SnapstoreWriter(client))
            out.put((rank, "saved", step, full()))
        client.close()
        dist.destroy_process_group()
        out.put((rank, "done", -1, None))
    except BaseException as e:
        _report_error(cfg, out, e)


def _small_state(seed: int) -> dict[str, Any]:
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(8, 16)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "extra": {"epoch": 3}}


def save_and_load(cfg: dict[str, Any], out: Any) -> None:
    """``dcp.save`` then ``dcp.load``, and ``dcp.async_save`` then ``dcp.load``, compared.

    Reports ("done", latest step, "ok") or what differed.
    """
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

        from snapstore.clients.dcp import SnapstoreReader, SnapstoreWriter

        dist, client = _setup(cfg)
        wrong: list[str] = []
        saved = _small_state(seed=1)
        dcp.save(saved, storage_writer=SnapstoreWriter(client), checkpoint_id="step-1")
        dist.barrier()
        fresh = _small_state(seed=2)
        dcp.load(fresh, storage_reader=SnapstoreReader(client))
        if digest(fresh) != digest(saved):
            wrong.append("dcp.load after dcp.save")
        # async_save: the same, through DCP's background staging.
        saved2 = _small_state(seed=3)
        pending = dcp.async_save(
            saved2, storage_writer=SnapstoreWriter(client), checkpoint_id="step-2"
        )
        # A stager that stages in the background answers with two futures; the default
        # stager (used here) with the upload's future alone.
        upload = pending.upload_completion if isinstance(pending, AsyncSaveResponse) else pending
        upload.result()
        dist.barrier()
        fresh2 = _small_state(seed=4)
        dcp.load(fresh2, storage_reader=SnapstoreReader(client))
        if digest(fresh2) != digest(saved2):
            wrong.append("dcp.load after dcp.async_save")
        latest = client.latest_step()
        client.close()
        dist.destroy_process_group()
        out.put((cfg["rank"], "done", latest, "; ".join(wrong) or "ok"))
    except BaseException as e:
        _report_error(cfg, out, e)
