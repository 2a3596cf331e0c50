"""What training code calls: the snapstore client and its adapters.

- :class:`Client` saves a rank's state every step and restores the last
  committed step (see :mod:`clients.client`).
- :class:`clients.dp.DPGroup` stores data-parallel replicated state once.
- :mod:`clients.dcp` plugs snapstore into ``torch.distributed.checkpoint``.
- :mod:`clients.ray_train` saves and restores from a Ray Train loop.
"""

from clients.client import Client
from clients.dp import DPGroup
from clients.future import SaveFuture

__all__ = ["Client", "DPGroup", "SaveFuture"]
