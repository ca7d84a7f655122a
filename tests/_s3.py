"""A real S3-compatible server on loopback (moto), and a TCP proxy that can fail like a network.

Used by the pytest fixtures in conftest.py and by scripts/bench_s3.py.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import select
import socket
import threading
import uuid
from typing import Optional

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key-s3cr3t"
REGION = "us-east-1"


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def storage_options(endpoint: str, **extra: str) -> dict[str, str]:
    return {"endpoint": endpoint, "allow_http": "true", "region": REGION,
            "aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY, **extra}


_conditional_writes_atomic = threading.Lock()
_CONDITIONS = ("If-None-Match", "If-Match")


def _make_conditional_writes_atomic() -> None:
    """Make moto's conditional PUTs atomic, as S3's are.

    moto 5 checks ``If-None-Match: *`` and then stores the object in two steps,
    with nothing held between them, on a threaded server: two concurrent creates
    of one key can both succeed. Lance commits a table version with exactly that
    create (and our object-store maintenance lock relies on it), so under CPU load
    two hosts could both "win" a commit on the test server, which real S3 never
    allows. Serialising conditional writes (and only those) restores S3's rule.
    """
    from moto.s3.responses import S3Response

    if getattr(S3Response, "_iai_atomic_conditions", False):
        return
    for name in ("put_object", "_key_response_post"):
        plain = getattr(S3Response, name)

        def serialised(self, *args, _plain=plain, **kwargs):
            if any(self.headers.get(h) for h in _CONDITIONS):
                with _conditional_writes_atomic:
                    return _plain(self, *args, **kwargs)
            return _plain(self, *args, **kwargs)

        setattr(S3Response, name, serialised)
    S3Response._iai_atomic_conditions = True


class S3Server:
    """moto's standalone server on a free 127.0.0.1 port, with one bucket (conditional writes made atomic)."""

    def __init__(self, bucket: str = "iai-queue-test"):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        _make_conditional_writes_atomic()
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.client().create_bucket(Bucket=bucket)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def new_uri(self) -> str:
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:12]}"

    def storage_options(self, endpoint: Optional[str] = None, **extra: str) -> dict[str, str]:
        return storage_options(endpoint or self.endpoint, **extra)

    def stop(self) -> None:
        self._server.stop()


class ProxyMode(enum.Enum):
    PASS = "pass"      # forward bytes both ways
    REFUSE = "refuse"  # nothing listens: connect() is refused; open connections are reset
    HANG = "hang"      # connections are accepted and held; no byte goes either way


class TcpProxy:
    """A loopback TCP proxy in front of ``target_port`` whose failure mode a test switches."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._mode = ProxyMode.PASS
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._listener: Optional[socket.socket] = None
        self._closed = threading.Event()
        self._listen()
        self._acceptor = threading.Thread(target=self._accept_loop, name="tcp-proxy-accept", daemon=True)
        self._acceptor.start()

    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        s.settimeout(0.1)
        self._listener = s

    def set_mode(self, mode: ProxyMode) -> None:
        with self._lock:
            old, self._mode = self._mode, mode
            if mode is ProxyMode.REFUSE and self._listener is not None:
                self._listener.close()
                self._listener = None
                for a, b in self._conns:
                    _reset(a)
                    _reset(b)
                self._conns.clear()
            elif old is ProxyMode.REFUSE and mode is not ProxyMode.REFUSE:
                self._listen()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                self._closed.wait(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), name="tcp-proxy-pump",
                             daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                try:
                    ready, _, _ = select.select([a, b], [], [], 0.1)
                except (OSError, ValueError):
                    return
                if self._mode is not ProxyMode.PASS:
                    continue  # HANG: hold both ends, move nothing
                for src in ready:
                    dst = b if src is a else a
                    try:
                        data = src.recv(65536)
                        if not data:
                            return
                        dst.sendall(data)
                    except OSError:
                        return
        finally:
            with self._lock:
                if (a, b) in self._conns:
                    self._conns.remove((a, b))
            a.close()
            b.close()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._listener is not None:
                self._listener.close()
            for a, b in self._conns:
                _reset(a)
                _reset(b)
        self._acceptor.join(timeout=2)


def _reset(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
