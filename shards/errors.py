"""The cache's exceptions, in one module every other one may import (it imports nothing).

One hierarchy, rooted at `ShardError`:

- `ShardError`: a shard or other cache file that is missing or wrong; the message starts with
  its name. Readers, the loader and `shards verify` raise it.
- `StoreError` (a `ShardError` and an `OSError`): a storage operation failed for good, after the
  retries; the message starts with the location. `ReadOnlyStoreError`: a write to a store that
  can only be read (https://).
- `ManifestError`: a manifest, record or identity file that is missing, unreadable or inconsistent.
- `PublishConflictError`: another file, with other content, is already published under a name.
- Elsewhere, each beside the code that raises it: `shards.schema.SampleError` (a malformed
  sample), `shards.limits.LimitError` (an input over its cap), `shards.verify.VerifyError`,
  `shards.lock.LockError` (another writer holds a lock).

Train and precompute map these to one-line messages and exit code 1 (`shards.runtime`).
"""

from __future__ import annotations


class ShardError(Exception):
    """A shard (or other cache file) that is missing or wrong; the message starts with its name."""


class StoreError(ShardError, OSError):
    """A remote storage operation failed for good; the message starts with the location."""


class ReadOnlyStoreError(StoreError):
    """A write to a store that can only be read (https://)."""


class ManifestError(ShardError, ValueError):
    """A manifest, record or identity file that is missing, unreadable or inconsistent."""


class PublishConflictError(ShardError, FileExistsError):
    """`put_file` found another file, with other content, already published under its name."""
