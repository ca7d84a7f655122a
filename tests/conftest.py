import random
import threading
import time
import uuid
from pathlib import Path

import pytest

from iai_queue import MemoryRecord, MemoryStore

DIM = 8


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """No test writes to the real ~/.iai-mcp: HOME and the env overrides point into tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("IAI_QUEUE_SPILL_DIR", raising=False)
    monkeypatch.delenv("IAI_QUEUE_STORE", raising=False)
    # The store's background maintenance thread would outlive a test and disturb the
    # tests that count threads; the tests of maintenance pass maintenance= explicitly.
    monkeypatch.setenv("IAI_QUEUE_MAINTENANCE", "never")
    return home


@pytest.fixture
def spill_dir(_isolated_home) -> Path:
    return _isolated_home / ".iai-mcp" / ".provenance-overflow"


def make_records(n: int, dim: int = DIM, seed: int = 0) -> list[MemoryRecord]:
    rnd = random.Random(seed)
    return [MemoryRecord(id=uuid.UUID(int=rnd.getrandbits(128), version=4), text=f"record {i}",
                         embedding=[rnd.random() for _ in range(dim)]) for i in range(n)]


@pytest.fixture
def store(tmp_path) -> MemoryStore:
    return MemoryStore(tmp_path / "db", dim=DIM)


@pytest.fixture
def records(store) -> list[MemoryRecord]:
    recs = make_records(20)
    store.insert_many(recs)
    return recs


def slow_store(store, delay: float) -> None:
    """Wraps store.append_provenance_batch (the sanctioned fault seam): every write takes ``delay`` longer."""
    real = store.append_provenance_batch

    def slow(pairs, records_cache=None):
        time.sleep(delay)
        return real(pairs, records_cache=records_cache)

    store.append_provenance_batch = slow


class Gate:
    """Wraps store.append_provenance_batch (the sanctioned fault seam): blocks writes until opened."""

    def __init__(self, store):
        self.store = store
        self.real = store.append_provenance_batch
        self.open_event = threading.Event()
        self.entered = threading.Event()
        self.calls = 0
        store.append_provenance_batch = self

    def __call__(self, pairs, records_cache=None):
        self.calls += 1
        self.entered.set()
        self.open_event.wait(30)
        return self.real(pairs, records_cache=records_cache)

    def open(self):
        self.open_event.set()


@pytest.fixture
def gate(store):
    g = Gate(store)
    yield g
    g.open()


# -- a real S3-compatible server on loopback -------------------------------------------


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on a free 127.0.0.1 port, one bucket, for the whole session."""
    from _s3 import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_uri(s3_server) -> str:
    """A fresh ``s3://bucket/prefix`` for one test."""
    return s3_server.new_uri()


@pytest.fixture
def s3_options(s3_server) -> dict:
    return s3_server.storage_options()


@pytest.fixture
def s3_store(s3_uri, s3_options) -> MemoryStore:
    return MemoryStore(s3_uri, dim=DIM, storage_options=s3_options)


@pytest.fixture
def small_fs(tmp_path):
    """A real 256 KiB tmpfs (the test skips where mounting is not allowed): a disk that fills up."""
    from _loss_helpers import small_tmpfs

    with small_tmpfs(tmp_path / "small", "256k") as mnt:
        yield mnt
