"""The control plane: membership, placement, commits, recovery, the coordinator.

- :mod:`snapstore.control.plane` -- the control plane as one object; its Ray
  shell is :mod:`snapstore.control.coordinator`, the coordinator actor.
- :mod:`snapstore.control.membership`, :mod:`snapstore.control.jobs`,
  :mod:`snapstore.control.states` -- what the coordinator knows of nodes and
  jobs, and their lifecycles as explicit states.
- :mod:`snapstore.control.placement` -- stripe groups and where each chunk lives.
- :mod:`snapstore.control.orders` -- byte-work orders derived from records.
- :mod:`snapstore.control.commit`, :mod:`snapstore.control.recovery`,
  :mod:`snapstore.control.fallback`, :mod:`snapstore.control.flush` -- the
  commit protocol, recovery after failures, restoring from and flushing to
  the persisted tier.
- :mod:`snapstore.control.smp`, :mod:`snapstore.control.member`,
  :mod:`snapstore.control.leader` -- each node's SMP actor, its agent, and
  a stripe group's leader.
- :mod:`snapstore.control.handle` -- a handle on a running store, for
  clients, tools and the REST server.
"""
