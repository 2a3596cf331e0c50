"""torchrun + snapstore: a DDP job that survives trainer crashes and node losses, bitwise.

A plain training script: no controller, no failure handling. torchelastic
restarts the workers after a failure (``--max-restarts``); every worker of
every (re)start restores the job's last committed step and trains on. What
lies between -- ending the failed incarnation's steps, rebuilding a lost
node's ranks from parity onto the node that now runs them -- the store does
when the new workers restore. Launch one agent per store node, after
``snapstore up``::

    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1   # lets a replacement agent join
    torchrun --nnodes 2 --nproc-per-node 1 --max-restarts 3 \\
        --rdzv-backend c10d --rdzv-endpoint HEAD:29400 --rdzv-id my-job \\
        --rdzv-conf keep_alive_interval=1,keep_alive_max_attempt=3 \\
        docs/examples/torchrun_ddp.py --steps 200 --out result.json

(docs/client.md says why each option.) On one machine several agents can
stand for several hosts: give each agent's workers the store node they
stand for (``SNAPSTORE_NODE``, an id or a unique prefix from ``snapstore
status``); tests/launchers/test_torchrun.py does that, kills a worker, then
a whole node with its agent, starts a replacement node and agent, and
compares the final model bitwise with a run without failures.

It trains the same model on the same data as docs/examples/ray_train_example.py:
the same job under either launcher ends in the same bits.

Data parallelism is DDP over gloo with ``find_unused_parameters=True``: DDP
then keeps the gradient buckets of its first iteration instead of rebuilding
them after it, so a restarted job reduces gradients in the same order as the
uninterrupted one did, and the result is the same to the bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from typing import Any


def _digest(model: Any, opt: Any) -> str:
    """SHA-256 over the parameters and the optimizer state, bitwise."""
    import torch

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for pid, st in sorted(opt.state_dict()["state"].items()):
        for name, t in sorted(st.items()):
            h.update(f"{pid}.{name}".encode())
            h.update(torch.as_tensor(t).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(job: str, steps: int, out: str | None, pause: float) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from snapstore.clients import Client
    from snapstore.errors import SnapshotNotFoundError

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun's environment says where and who
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    model = DDP(net, find_unused_parameters=True)  # it warns once: no parameter went unused
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    client = Client(job, rank=rank, world_size=world)

    # Every rank restores, after every (re)start: a restarted job resumes only
    # when all its ranks have restored the same step.
    start = 0
    try:
        step, saved = client.restore()
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])
        start = step + 1
    except SnapshotNotFoundError:
        pass  # a fresh job

    saved_future = None
    for step in range(start, steps):
        g = torch.Generator().manual_seed(step * 1000 + rank)  # the data is a function of the step
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 8, (16,), generator=g)
        F.cross_entropy(model(x), y).backward()
        client.wait_staged()  # the previous step's copy is done: parameters may change
        opt.step()
        opt.zero_grad()
        # A save refused because the job restarted raises RestoreRequiredError:
        # let it end the process; torchrun restarts every worker.
        state = {"model": net.state_dict(), "optim": opt.state_dict()}
        saved_future = client.save(step, state, lazy=True)  # copies during the next step
        time.sleep(pause)  # --pause: slow enough for a test to hit a chosen step
    if saved_future is not None:
        saved_future.result(timeout=120)  # the last step is committed before the job ends
    if rank == 0 and out:
        with open(out, "w") as f:
            json.dump({"digest": _digest(net, opt), "start": start, "world": world}, f)
    client.close()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", default="torchrun-ddp", help="the snapstore job name")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=None, help="rank 0 writes the final digest here (JSON)")
    p.add_argument("--pause", type=float, default=0.0, help="seconds to sleep after each step")
    a = p.parse_args()
    train(a.job, a.steps, a.out, a.pause)


if __name__ == "__main__":
    if "RANK" not in os.environ:
        raise SystemExit("launch this script with torchrun (see its docstring)")
    main()
