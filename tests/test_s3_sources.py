"""WebDataset input tars on a real S3 server (SeaweedFS): s3:// listings and brace patterns, the
server's public http(s):// view, truncation, and a server restart in the middle of a tar.

Remote tars must read exactly like the same tars on local disk (same items, same bytes, same
error items), and a SIGKILLed-and-restarted server mid-tar must give the items of an
uninterrupted read: the stream resumes at the byte reached (a Range request), it neither starts
the tar again nor loses samples.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import tarfile
import threading

import numpy as np
import pytest
from s3server import bucket_fixtures
from test_sources import img2dataset_sample, write_tar

from precompute.sources import SourceError, WebDatasetSource, open_source

BUCKET = "wds-inputs"


server, aws_env = bucket_fixtures(BUCKET)


def _view(items) -> list[tuple]:
    return [(it.image, it.cond, it.captions, it.error and it.error[0]) for it in items]


def _all(src) -> list:
    return [it for u in range(src.num_units()) for it in src.iter_unit(u)]


@pytest.fixture(scope="module")
def uploaded(server, tmp_path_factory):
    """Three img2dataset-style tars (one gzipped) in a local folder and under s3://BUCKET/wds/."""
    local = tmp_path_factory.mktemp("wds")
    s3 = server.client()
    names = ["00000.tar", "00001.tar", "00002.tar.gz"]
    for i, name in enumerate(names):
        write_tar(local / name, [img2dataset_sample(f"{i}{k:04d}", 10 * i + k) for k in range(3)],
                  compress=name.endswith(".gz"))
        s3.put_object(Bucket=BUCKET, Key=f"wds/{name}", Body=(local / name).read_bytes())
    s3.put_object(Bucket=BUCKET, Key="wds/00000_stats.json", Body=b"{}")  # img2dataset side files: ignored
    return local, names


def test_remote_tars_read_exactly_like_local_ones(server, uploaded):
    local, names = uploaded
    want = open_source(local)
    want_items = _all(want)
    assert len(want_items) == 9 and all(it.error is None for it in want_items)

    listed = open_source(f"s3://{BUCKET}/wds/")
    assert isinstance(listed, WebDatasetSource) and [listed.unit_name(u) for u in range(3)] == names
    got = _all(listed)
    assert [it.source_id for it in got] == [it.source_id for it in want_items]
    assert _view(got) == _view(want_items)
    # The same tars as the local folder: the same item fingerprints.
    assert [listed.unit_fingerprints(u) for u in range(3)] == [want.unit_fingerprints(u) for u in range(3)]
    assert listed.describe()["path"] == f"s3://{BUCKET}/wds/"

    pattern = open_source(f"s3://{BUCKET}/wds/{{00000..00001}}.tar")
    assert pattern.num_units() == 2 and pattern.unit_name(1) == f"s3://{BUCKET}/wds/00001.tar"
    assert _view(_all(pattern)) == _view(want_items[:6])
    single = open_source(f"s3://{BUCKET}/wds/00002.tar.gz")
    assert _view(_all(single)) == _view(want_items[6:])

    http = f"{server.endpoint}/{BUCKET}/wds"  # the bucket's public (anonymous) http view
    over_http = open_source(f"{http}/{{00000..00001}}.tar")
    assert _view(_all(over_http)) == _view(want_items[:6])
    assert _view(_all(open_source(f"{http}/00002.tar.gz", max_samples=2))) == _view(want_items[6:8])

    with pytest.raises(SourceError, match=r"1 of 3 tars do not exist: s3://.*/00002\.tar"):
        open_source(f"s3://{BUCKET}/wds/{{00000..00002}}.tar")
    with pytest.raises(SourceError, match="no .tar files found"):
        open_source(f"s3://{BUCKET}/nothing-here/")


def test_a_truncated_remote_tar_is_the_same_error_item_as_locally(server, uploaded, tmp_path):
    local, _ = uploaded
    data = (local / "00000.tar").read_bytes()
    per_sample = len(img2dataset_sample("0", 0)) - 1
    members = tarfile.open(fileobj=io.BytesIO(data)).getmembers()
    cuts = {"at-boundary.tar": data[: members[2 * per_sample].offset],  # tarfile sees a clean end here
            "mid-member.tar": data[: members[per_sample + 1].offset_data + 10]}
    s3 = server.client()
    for name, body in cuts.items():
        (tmp_path / name).write_bytes(body)
        s3.put_object(Bucket=BUCKET, Key=f"cut/{name}", Body=body)
    for name in cuts:
        want = _all(open_source(tmp_path / name))
        got = _all(open_source(f"s3://{BUCKET}/cut/{name}"))
        assert [e for *_, e in _view(got)] == [e for *_, e in _view(want)] == [None, "tar_corrupt"]
        assert _view(got) == _view(want)
        assert f"s3://{BUCKET}/cut/{name}" in got[-1].error[1] and "items after this point are lost" in got[-1].error[1]


def test_a_server_restart_mid_tar_resumes_the_stream(server, monkeypatch, caplog):
    """~24 MB tar of 8 samples: killed after the first sample, far more than loopback buffers hold."""
    rng = np.random.default_rng(0)
    samples = [{"__key__": f"{k:04d}", "jpg": rng.bytes(3 << 20), "txt": f"caption {k}".encode(),
                "cond.png": rng.bytes(1000)} for k in range(8)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            for suffix in ("jpg", "txt", "cond.png"):
                info = tarfile.TarInfo(f"{s['__key__']}.{suffix}")
                info.size = len(s[suffix])
                tf.addfile(info, io.BytesIO(s[suffix]))
    server.client().put_object(Bucket=BUCKET, Key="big/big.tar", Body=buf.getvalue())
    url = f"s3://{BUCKET}/big/big.tar"
    digest = lambda it: (it.source_id, hashlib.sha256(it.image).hexdigest(), it.cond, it.captions, it.error)  # noqa: E731
    want = [digest(it) for it in open_source(url).iter_unit(0)]
    assert len(want) == 8 and all(d[-1] is None for d in want)

    # A budget that outlasts a restart (13-25 s on a busy 2-core box).
    monkeypatch.setenv("SHARDS_RETRY_SECONDS", "120")
    monkeypatch.setenv("SHARDS_RETRY_ATTEMPTS", "200")
    src = open_source(url)
    got, thread = [], None
    with caplog.at_level(logging.WARNING, logger="shards.remote"):
        for n, it in enumerate(src.iter_unit(0)):
            got.append(digest(it))
            if n == 0:
                server.kill()
                thread = threading.Thread(target=server.start)
                thread.start()
    thread.join()
    assert got == want
    resumed = [int(m) for m in re.findall(r"big\.tar at byte (\d+): .*retry", caplog.text)]
    assert resumed and min(resumed) > 3 << 20, caplog.text  # resumed past the first sample, not from 0
