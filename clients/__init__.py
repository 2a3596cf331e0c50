"""What training code calls: the snapstore client and its adapters.

- :class:`Client` saves a rank's state every step and restores the last
  committed step (see :mod:`snapstore.clients.client`).
- :class:`snapstore.clients.dp.DPGroup` stores data-parallel replicated state once.
- :mod:`snapstore.clients.dcp` plugs snapstore into ``torch.distributed.checkpoint``.
- :mod:`snapstore.clients.ray_train` saves and restores from a Ray Train loop.
- :mod:`snapstore.clients.hf` snapshots a Hugging Face Trainer every step and resumes it.
- :class:`JobControl` reads a job's latest step and events and ends its
  steps in flight, from Python.
"""

from snapstore.clients.client import Client
from snapstore.clients.control import JobControl
from snapstore.clients.dp import DPGroup
from snapstore.clients.future import SaveFuture

__all__ = ["Client", "DPGroup", "JobControl", "SaveFuture"]
