"""The cache contract between precompute and train.

Owns the sample schema, the manifest and per-shard records, the atomic and reproducible shard
writer, the verifying streaming reader, the storage backends (local folders, s3://, read-only
https://) and the `python -m shards ls|stats|verify|gc` CLI. Imports no model code: both stages
import this, never each other.
"""
