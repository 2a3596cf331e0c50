"""The control plane: placement, commits, recovery, the coordinator.

- :mod:`snapstore.control.placement` -- stripe groups and where each chunk lives.
- :mod:`snapstore.control.orders` -- byte-work orders derived from records.
- :mod:`snapstore.control.state` -- what the coordinator knows of nodes and jobs.
- :mod:`snapstore.control.commit`, :mod:`snapstore.control.recovery`,
  :mod:`snapstore.control.fallback`, :mod:`snapstore.control.flush` -- the
  commit protocol, recovery after failures, restoring from and flushing to
  the persisted tier.
- :mod:`snapstore.control.coordinator` -- the coordinator actor.
- :mod:`snapstore.control.handle` -- a handle on a running store, for
  clients, tools and the REST server.
"""
