"""`python -m shards ls|stats|verify|gc URL`: look inside a cache, and clean up after killed writers.

- ls      one line per shard (name, samples, bytes, sha256 prefix, skipped) and the totals.
- stats   totals, bytes per sample by member (and per tensor inside the safetensors member),
          tar framing overhead, tensor shapes, and skip reasons. Reads the shards' members.
- verify  re-reads every shard and checks it against the manifest (see shards.verify); exits 1
          naming the first bad file and why, 0 with a summary line when everything holds.
- gc      removes what killed writers left behind (`Store.cleanup_incomplete`): unfinished
          multipart uploads (s3://, invisible but billed), temp files (local caches) and this
          machine's staged temp files of the cache (in the system temp folder, or with --tmp-dir
          in that folder's per-cache subfolder); with --orphans also shards that have no valid
          record and are not in the manifest. Run it only while no precompute writes the cache.

ls, stats and verify need manifest.json (a cache whose precompute did not finish has none); gc
does not. Errors print one line and exit 1, as in precompute and train (`shards.runtime`).
"""

from __future__ import annotations

import struct
import sys
from collections import defaultdict
from typing import NoReturn

import click
from tqdm import tqdm

from . import limits, schema
from .errors import ShardError, StoreError
from .manifest import Manifest, ManifestError
from .reader import iter_shard_members
from .runtime import fail, run_command
from .store import Store
from .stores import open_store
from .units import human_bytes
from .views import stats_lines


def _fail(message: str) -> NoReturn:
    fail(message)  # "error: <message>", exit 1: the policy of every command (shards.runtime)


def _open(url: str) -> tuple[Store, Manifest]:
    try:
        store = open_store(url)
        return store, Manifest.load(store)
    except (ManifestError, ShardError, ValueError, OSError) as e:  # ShardError: also remote StoreErrors
        _fail(str(e))
        raise AssertionError  # unreachable: _fail exits


def safetensors_layout(data: bytes) -> tuple[int, dict[str, dict]]:
    """(header bytes incl. its 8-byte length, {tensor: {dtype, shape, nbytes}}) from the JSON
    header of a safetensors blob, without loading any tensor."""
    if len(data) < 8:
        raise ValueError("safetensors blob shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    header = limits.loads(data[8 : 8 + n], "the safetensors header")  # capped nesting, like every JSON read
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise ValueError("the header is not an object of tensor entries")
    layout = {
        name: {"dtype": str(v["dtype"]), "shape": list(v["shape"]),
               "nbytes": int(v["data_offsets"][1]) - int(v["data_offsets"][0])}
        for name, v in header.items()
        if name != "__metadata__"
    }
    return 8 + n, layout


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Inspect and verify a cache of precomputed SDXL adapter-training shards."""


@cli.command("ls")
@click.argument("url")
def ls_cmd(url: str) -> None:
    """One line per shard, then the totals."""
    _, manifest = _open(url)
    width = max([len(r.name) for r in manifest.shards] + [5])
    click.echo(f"{'shard':<{width}}  {'samples':>8}  {'bytes':>12}  {'skipped':>7}  sha256")
    for r in manifest.shards:
        skipped = sum(r.skipped.values())
        click.echo(f"{r.name:<{width}}  {r.samples:>8}  {r.bytes:>12}  {skipped:>7}  {r.sha256[:12]}")
    t = manifest.totals
    click.echo(
        f"total: {len(manifest.shards)} shards, {t['samples']} samples, {t['bytes']} bytes "
        f"({human_bytes(t['bytes'])}), {sum(t['skipped'].values())} skipped"
    )


@cli.command("stats")
@click.argument("url")
@click.option("--max-shards", type=click.IntRange(min=1), default=None,
              help="Read only the first N shards for the per-member breakdown (totals always cover all).")
def stats_cmd(url: str, max_shards: int | None) -> None:
    """Totals, bytes per sample by member and tensor, and skip reasons."""
    store, manifest = _open(url)
    t = manifest.totals
    samples = t["samples"]
    lat, txt, geo = manifest.latent, manifest.text, manifest.geometry
    click.echo(f"cache      {store.url}")
    click.echo(f"format     {manifest.format} v{manifest.format_version}, code {manifest.code_version}" + (f", created {manifest.created}" if manifest.created else ""))
    click.echo(
        f"contents   latent {lat.channels} ch ({lat.store}, x{lat.scaling_factor}), text "
        f"{txt.max_length}x{txt.prompt_dim} + {txt.pooled_dim}, resolution {geo.resolution}"
        f"{' with buckets' if geo.buckets else ''}, storage {manifest.dtypes.storage}"
    )
    click.echo(f"shards     {len(manifest.shards)}")
    click.echo(f"samples    {samples}")
    per = f", {t['bytes'] / samples:.1f} per sample" if samples else ""
    click.echo(f"bytes      {t['bytes']} ({human_bytes(t['bytes'])}){per}")
    for line in stats_lines(t):  # views per image and their storage cost; samples per bucket
        click.echo(line)

    records = manifest.shards[:max_shards] if max_shards else manifest.shards
    member_bytes: dict[str, int] = defaultdict(int)
    tensor_bytes: dict[str, int] = defaultdict(int)
    tensor_shapes: dict[str, set] = defaultdict(set)
    header_bytes = 0
    n = 0
    shard_bytes = 0
    try:
        for r in tqdm(records, desc="stats", unit="shard", disable=None, file=sys.stderr):
            shard_bytes += r.bytes
            for key, members in iter_shard_members(store, r, check=False):
                n += 1
                for suffix, data in members.items():
                    member_bytes[suffix] += len(data)
                try:
                    hdr, layout = safetensors_layout(members[schema.TENSOR_MEMBER])
                except (ValueError, KeyError, TypeError) as e:
                    _fail(f"{store.display(r.name)}: sample {key}: cannot parse the safetensors header of "
                          f"{key}.{schema.TENSOR_MEMBER} ({type(e).__name__}: {e}); run `python -m shards verify {url}`")
                header_bytes += hdr
                for name, info in layout.items():
                    tensor_bytes[name] += info["nbytes"]
                    tensor_shapes[name].add(f"{info['dtype']} " + "x".join(map(str, info["shape"])))
    except ShardError as e:
        _fail(f"{e} (run `python -m shards verify {url}`)")

    scope = "" if len(records) == len(manifest.shards) else f" (first {len(records)} of {len(manifest.shards)} shards)"
    click.echo(f"\nper sample by member{scope}: {n} samples read")
    if n:
        rows: list[tuple[str, int]] = []
        for suffix in schema.MEMBERS:
            rows.append(("." + suffix, member_bytes[suffix]))
            if suffix == schema.TENSOR_MEMBER:
                for name in sorted(tensor_bytes):
                    shapes = sorted(tensor_shapes[name])
                    shape = ", ".join(shapes) if len(shapes) <= 3 else f"{len(shapes)} shapes"
                    rows.append((f"  {name} [{shape}]", tensor_bytes[name]))
                rows.append(("  (safetensors header)", header_bytes))
        rows.append(("(tar headers + padding)", shard_bytes - sum(member_bytes.values())))
        width = max(len(label) for label, _ in rows)
        click.echo(f"  {'member':<{width}}  {'bytes/sample':>12}  {'share':>6}  {'total':>12}")
        for label, total in rows:
            click.echo(f"  {label:<{width}}  {total / n:>12.1f}  {100 * total / shard_bytes:>5.1f}%  {total:>12}")
    notes = t.get("notes") or {}
    if notes:
        click.echo("\nkept but altered: " + ", ".join(f"{r} {n}" for r, n in sorted(notes.items())))
    click.echo("\nskipped by reason" + ("" if t["skipped"] else ": none"))
    for reason, count in sorted(t["skipped"].items(), key=lambda kv: (-kv[1], kv[0])):
        click.echo(f"  {reason:<26} {count:>8}")


@cli.command("verify")
@click.argument("url")
def verify_cmd(url: str) -> None:
    """Re-read every shard and check it against the manifest; exit 1 at the first bad one."""
    from .verify import VerifyError, verify_cache  # torch: read only where tensors are

    store, manifest = _open(url)
    bar = tqdm(total=manifest.totals["samples"], desc="verify", unit="sample", disable=None, file=sys.stderr)
    try:
        summary = verify_cache(store, manifest, on_sample=lambda r: bar.update(1))
    except StoreError as e:  # the store failed (down, refusing, misbehaving): nothing says the cache is damaged
        bar.close()
        _fail(f"verify could not finish: {e}")
    except (VerifyError, ManifestError, ShardError) as e:
        bar.close()
        _fail(f"verify failed: {e}. To rebuild damaged or missing shards, re-run the precompute that made the cache "
              "(the same settings: a copy of its manifest.json works as --config) with --verify-existing")
    bar.close()
    click.echo(summary.line())


def _require_cache(store: Store) -> None:
    """gc deletes by name (temp files, shard-NNNNNN.tar without a record): only in a cache. Every
    cache has its identity.json, written before anything else, so a folder without one (a typo,
    a dataset, a training run) is refused, and nothing in it is touched."""
    if store.exists(schema.IDENTITY_FILE):
        return
    why = store.why_missing() or (f"{store.url}: not a cache (no {schema.IDENTITY_FILE}, which precompute writes "
                                  "before anything else)")
    raise ManifestError(f"{why}: gc removed nothing")


def _orphans(store: Store) -> list[str]:
    """Shards with no record at all (what a writer killed between publishing a shard and writing
    its record leaves), never one the manifest lists. It fails closed: a manifest that exists but
    cannot be read refuses the whole deletion, and a shard whose record exists is kept however that
    record reads (a damaged record, or a store answering garbage, must never cost a complete
    shard; precompute's re-run judges and rebuilds such a shard)."""
    listed: set[str] = set()
    if store.exists(schema.MANIFEST_FILE):
        try:
            listed = {r.name for r in Manifest.load(store).shards}
        except ManifestError as e:
            raise ManifestError(f"{e}\n  gc --orphans deleted nothing: which shards are orphans is judged against "
                                "the manifest, so it must be readable (restore it, or remove it knowingly)") from None
    out = []
    for rel in store.list(schema.SHARD_DIR):
        index = schema.index_of(rel)
        if index is None or rel in listed:  # not ours to judge
            continue
        if not store.exists(schema.record_name(index)):
            out.append(rel)
    return out


@cli.command("gc")
@click.argument("url")
@click.option("--orphans", is_flag=True, help="Also delete shards that have no record and are not in the manifest.")
@click.option("--tmp-dir", metavar="DIR", default=None,
              help="The --tmp-dir the killed precompute used: also empty this cache's staging folder in it "
                   "(default: the staging folder in the system temp folder, for s3:// caches).")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
def gc_cmd(url: str, orphans: bool, tmp_dir: str | None, dry_run: bool) -> None:
    """Remove leftovers of killed writers. Only while no precompute is writing to URL."""
    try:
        store = open_store(url)
        _require_cache(store)
        doomed = _orphans(store) if orphans else []  # judged first: a refusal removes nothing at all
        removed = store.cleanup_incomplete(tmp_dir=tmp_dir, dry_run=dry_run)
        if not dry_run:
            for rel in doomed:
                store.delete(rel)
    except (ShardError, ValueError, OSError) as e:
        _fail(str(e))
        raise AssertionError  # unreachable
    verb = "would remove" if dry_run else "removed"
    # cleanup_incomplete answers cache-relative paths for what is in the cache (uploads on S3,
    # temp files in a local cache) and absolute paths for staged files outside it.
    in_cache_kind = "unfinished upload" if store.url.startswith("s3://") else "temp file"
    counts: dict[str, int] = {}
    for item in removed:
        kind = "staged temp file" if item.startswith("/") else in_cache_kind
        counts[kind] = counts.get(kind, 0) + 1
        click.echo(f"{verb} {kind}: {item}")
    for rel in doomed:
        click.echo(f"{verb} orphan shard: {rel}")
    parts = [f"{counts.get(in_cache_kind, 0)} {in_cache_kind}(s)"]
    if counts.get("staged temp file"):
        parts.append(f"{counts['staged temp file']} staged temp file(s)")
    if orphans:
        parts.append(f"{len(doomed)} orphan shard(s)")
    click.echo(f"gc {store.url}: {verb} " + ", ".join(parts))


def main() -> None:
    """The command under the exit-code and signal policy the stages share (`shards.runtime`)."""
    def work() -> None:
        # Not click's standalone mode: it would turn Ctrl-C into "Aborted!" (exit 1) before the
        # policy saw it; usage errors are still shown and exit as click's own.
        try:
            code = cli.main(prog_name="python -m shards", standalone_mode=False)
        except click.exceptions.Abort:
            raise KeyboardInterrupt from None
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        if isinstance(code, int) and code:
            sys.exit(code)

    run_command(work, user_errors=(ShardError,), continue_hint="re-run the command")
