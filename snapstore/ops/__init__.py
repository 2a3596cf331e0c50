"""Operating a store: the embedded cluster, ``up`` and ``down``, failure injection, export.

- :mod:`snapstore.ops.cluster` -- Ray head and worker raylets on loopback.
- :mod:`snapstore.ops.lifecycle` -- ``up``, ``down``, replacement nodes.
- :mod:`snapstore.ops.faults` -- failure injection on embedded stores.
- :mod:`snapstore.ops.export` -- a step as ``torch.save`` files or a DCP checkpoint.
"""
