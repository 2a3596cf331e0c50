"""The format layer: a training state as bytes, and the records that describe them.

- :mod:`snapstore.format.pack` -- a state (nested dicts/lists of tensors,
  arrays and plain values) to one buffer plus a msgpack manifest, and back.
- :mod:`snapstore.format.layout`, :mod:`snapstore.format.manifest`,
  :mod:`snapstore.format.tree` -- where each tensor's bytes sit; the
  manifest's encoding; the state's tree of plain values.
- :mod:`snapstore.format.frame` -- a slot's frame: data, manifest, trailer.
- :mod:`snapstore.format.record` -- a committed step's record: where every
  byte of every rank is and what it must hash to.
- :mod:`snapstore.format.bytecopy` -- multi-threaded memmove.

This package imports no submodule eagerly: the SMPs read records without
importing torch (which :mod:`snapstore.format.pack` needs).
"""
