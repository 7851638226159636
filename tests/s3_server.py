"""A real S3-compatible server on 127.0.0.1 for the object-store tests and the soak (``jobs/soak.py``).

:class:`S3Server` starts moto's standalone server (``python -m moto.server``) in a
subprocess: an HTTP server that speaks the S3 protocol, never an in-process mock. It
enforces authentication (``INITIAL_NO_AUTH_ACTION_COUNT``): the first three requests
create an IAM user, its access key and an allow-all policy; every later request must be
signed with that key, so wrong credentials are refused as a real store refuses them.
Clients reach it through :attr:`S3Server.env` only, as on a cluster: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``; nothing is written
into the project.

The endpoint the clients use is a byte forwarder (``python tests/s3_server.py forward``),
a second subprocess in front of moto. :meth:`S3Server.stop_endpoint` kills it (open
connections reset, new ones refused: the store is down for its clients) and
:meth:`S3Server.start_endpoint` brings it back on the same port with every object kept,
as a real object store keeps its objects across a restart (moto keeps them in memory
only, so restarting moto itself would lose them). The test reads the store directly
(:meth:`S3Server.keys`) while its endpoint is down.

Every process it starts is ended by :meth:`S3Server.close`, and with the process that
started it should that die first (moto through ``PR_SET_PDEATHSIG``, the forwarder by
watching its parent).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

try:  # loaded here, not in the forked child
    import ctypes

    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not Linux
    _LIBC = None

HOST = "127.0.0.1"
REGION = "us-east-1"
_SETUP_ACTIONS = 3  # create_user, create_access_key, put_user_policy: unauthenticated; then signed only


def _die_with_parent() -> None:
    """In the child: SIGKILL when the thread that started it ends (started from the main thread only)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server on port {port} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


class S3Server:
    """moto's S3 server in a subprocess, behind a forwarder the tests can stop and restart."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.backend_port = free_port()
        self.port = free_port()
        self.endpoint = f"http://{HOST}:{self.port}"
        self.backend_endpoint = f"http://{HOST}:{self.backend_port}"
        self._moto: subprocess.Popen | None = None
        self._front: subprocess.Popen | None = None
        self._logs: list = []
        self.key_id = ""
        self.secret = ""

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> "S3Server":
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_SETUP_ACTIONS)
        log = self.tmp / "moto.log"
        f = open(log, "w")
        self._logs.append(f)
        self._moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.backend_port)],
                                      env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=_die_with_parent)  # noqa: PLW1509 - one prctl call
        _wait_for_port(self.backend_port, self._moto, log)
        self._create_credentials()
        self.start_endpoint()
        return self

    def _create_credentials(self) -> None:
        import boto3

        iam = boto3.session.Session(aws_access_key_id="setup", aws_secret_access_key="setup",
                                    region_name=REGION).client("iam", endpoint_url=self.backend_endpoint)
        iam.create_user(UserName="dtd")
        key = iam.create_access_key(UserName="dtd")["AccessKey"]
        iam.put_user_policy(UserName="dtd", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def start_endpoint(self) -> None:
        """Start (or restart) the forwarder clients connect to, on the same port as before."""
        assert self._front is None or self._front.poll() is not None, "the endpoint is already up"
        log = self.tmp / "front.log"
        f = open(log, "a")
        self._logs.append(f)
        # No PR_SET_PDEATHSIG here: it fires when the *thread* that started the child ends, and a
        # fault injector restarts the endpoint from its own thread. The forwarder watches its parent
        # process instead and exits with it.
        self._front = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "forward", str(self.port), str(self.backend_port)],
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for_port(self.port, self._front, log)

    def stop_endpoint(self) -> None:
        """Take the store down for its clients: kill the forwarder (connections reset, new ones refused)."""
        if self._front is not None and self._front.poll() is None:
            self._front.send_signal(signal.SIGKILL)
            self._front.wait(30)

    def close(self) -> None:
        for p in (self._front, self._moto):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(30)
        for f in self._logs:
            f.close()

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what clients get ------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The environment a client (a driver, a Ray node, pandas) reaches the store with."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask a cloud's metadata service for credentials
        }

    def client(self):
        """A boto3 S3 client straight to moto (works while the endpoint is down)."""
        import boto3

        return boto3.session.Session(aws_access_key_id=self.key_id, aws_secret_access_key=self.secret,
                                     region_name=REGION).client("s3", endpoint_url=self.backend_endpoint)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> int:
        """Upload every file under ``local`` to ``s3://bucket/prefix/<relative path>``; returns the count."""
        c = self.client()
        n = 0
        for p in sorted(Path(local).rglob("*")):
            if p.is_file():
                c.upload_file(str(p), bucket, f"{prefix.strip('/')}/{p.relative_to(local).as_posix()}")
                n += 1
        return n

    def keys(self, bucket: str, prefix: str = "") -> dict[str, tuple[str, str]]:
        """``key -> (ETag, LastModified)`` of the objects under ``prefix`` (read from moto directly):
        an object rewritten with the same bytes still shows as changed."""
        c = self.client()
        out: dict[str, tuple[str, str]] = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            out.update({o["Key"]: (o["ETag"], o["LastModified"].isoformat()) for o in page.get("Contents", [])})
        return out


# ----------------------------------------------------------------------------- the forwarder


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _forward(listen: int, target: int) -> None:
    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, HOST, listen, reuse_address=True)
    parent = os.getppid()
    async with server:
        while os.getppid() == parent:  # the process that started it is gone: so is this endpoint
            await asyncio.sleep(0.5)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "forward":
        asyncio.run(_forward(int(sys.argv[2]), int(sys.argv[3])))
    else:
        sys.exit("usage: python tests/s3_server.py forward LISTEN_PORT TARGET_PORT")
