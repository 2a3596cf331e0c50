"""The persisted tier: committed steps flushed to a directory or an object store.

- :mod:`snapstore.persist.tier` -- layout, atomic publication, retention
  and verified reads (the functions re-exported here).
- :mod:`snapstore.persist.manifest` -- a step's manifest, bounded decoding.
- :mod:`snapstore.persist.objstore` -- the publication protocol of fsspec URLs.
- :mod:`snapstore.persist.throttle` -- the token bucket that paces flushes.

Pure files: no Ray, no torch.
"""

from snapstore.persist.tier import (
    MANIFEST_NAME,
    PERSIST_VERSION,
    PersistedRank,
    PersistedStep,
    PersistManifest,
    begin_step,
    clean_leftovers,
    is_url,
    job_dir,
    list_jobs,
    list_steps,
    newest_first,
    partial_dir,
    prepare_dir,
    prepare_root,
    publish_step,
    rank_file,
    read_manifest,
    read_rank,
    retain,
    step_dir,
    verify_rank,
    write_rank,
)

__all__ = [
    "MANIFEST_NAME",
    "PERSIST_VERSION",
    "PersistManifest",
    "PersistedRank",
    "PersistedStep",
    "begin_step",
    "clean_leftovers",
    "is_url",
    "job_dir",
    "list_jobs",
    "list_steps",
    "newest_first",
    "partial_dir",
    "prepare_dir",
    "prepare_root",
    "publish_step",
    "rank_file",
    "read_manifest",
    "read_rank",
    "retain",
    "step_dir",
    "verify_rank",
    "write_rank",
]
