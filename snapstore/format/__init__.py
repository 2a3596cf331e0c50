"""The format layer: a training state as bytes, and the records that describe them.

- :mod:`snapstore.format.pack.pack` -- a state (nested dicts/lists of tensors,
  arrays and plain values) to one buffer plus a msgpack manifest, and back.
- :mod:`snapstore.format.pack.layout`, :mod:`snapstore.format.pack.manifest`,
  :mod:`snapstore.format.pack.tree` -- where each tensor's bytes sit; the
  manifest's encoding; the state's tree of plain values.
- :mod:`snapstore.format.pack.frame` -- a slot's frame: data, manifest, trailer.
- :mod:`snapstore.format.pack.record` -- a committed step's record: where every
  byte of every rank is and what it must hash to.
- :mod:`snapstore.format.pack.bytecopy` -- multi-threaded memmove.

This package imports no submodule eagerly: the SMPs read records without
importing torch (which :mod:`snapstore.format.pack.pack` needs).
"""
