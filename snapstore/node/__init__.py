"""The node layer: one node's memory and byte work, without torch.

- :mod:`snapstore.node.segments` -- shared-memory segments and their names.
- :mod:`snapstore.node.slots` -- the slot table: which segment holds what,
  leases, commits, aborts, holds, the memory budget.
- :mod:`snapstore.node.transport` -- reading peers' segments (shared memory
  on one host, a token-checked TCP data server across hosts).
- :mod:`snapstore.node.channel` -- the control plane's calls to an SMP over
  one authenticated socket (the data server's sealing), past Ray's per-call cost.
- :mod:`snapstore.node.stripes` -- byte work of an order: encode, decode,
  fold deltas into parity, verify.
- :mod:`snapstore.node.api` -- the node interface the control plane uses.
- :mod:`snapstore.node.store` -- the real one: all of the above in shared
  memory (the SMP actor of :mod:`snapstore.control.smp` holds one).
"""
