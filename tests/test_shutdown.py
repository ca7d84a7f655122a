"""install_graceful_shutdown: drain-or-spill on a signal, then the previous disposition."""

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from iai_queue import MemoryStore, ProvenanceWriteQueue, install_graceful_shutdown

from conftest import DIM, make_records

CHILD = textwrap.dedent("""
    import signal, sys, time
    from iai_queue import MemoryStore, install_graceful_shutdown
    sys.path.insert(0, sys.argv[3])
    from conftest import make_records

    store = MemoryStore(sys.argv[1], dim=8)
    recs = make_records(5)
    store.insert_many(recs)
    q = store.enable_provenance_queue(coalesce_ms=60_000, spill_dir=sys.argv[2])  # nothing written until stopped
    install_graceful_shutdown(store, (signal.SIGTERM,))
    for i in range(40):
        q.enqueue([(recs[i % 5].id, {"n": i})])
    assert q.stats().pending == 40
    print("ready", flush=True)
    time.sleep(60)
    print("not killed", flush=True)
""")


@pytest.mark.timeout(60)
def test_sigterm_drains_then_dies_by_sigterm(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "db"), str(tmp_path / "spill"),
                             os.path.dirname(__file__)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, err  # the default disposition ran after the drain
    assert "not killed" not in out
    store = MemoryStore(tmp_path / "db", dim=DIM)
    recs = make_records(5)
    got = sorted(e["n"] for r in recs for e in store.get(r.id).provenance)
    assert got == list(range(40))
    assert store.provenance_rows() == 40
    assert not list((tmp_path / "spill").glob("*.jsonl")) if (tmp_path / "spill").exists() else True


@pytest.mark.timeout(30)
def test_previous_python_handler_runs_after_the_drain(store, records, tmp_path):
    q = ProvenanceWriteQueue(store, coalesce_ms=60_000, spill_dir=tmp_path / "spill").start()
    q.enqueue([(records[0].id, {"n": i}) for i in range(7)])
    seen = []
    chained = threading.Event()

    def previous(signum, frame):
        # The chain comes after the drain: the entries are already in the store.
        seen.append((signum, len(store.get(records[0].id).provenance), q.running))
        chained.set()

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        handle = install_graceful_shutdown(q, (signal.SIGUSR1,))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert chained.wait(20)
        assert handle.drained.is_set()
        assert seen == [(signal.SIGUSR1, 7, False)]
        handle.uninstall()
        assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        signal.signal(signal.SIGUSR1, old)
        q.stop()


@pytest.mark.timeout(30)
def test_an_ignored_signal_stays_ignored_after_the_drain(store, records, tmp_path):
    store.enable_provenance_queue(coalesce_ms=60_000, spill_dir=tmp_path / "spill")
    store.queue_provenance_batch([(records[1].id, {"n": 1})])
    old = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        handle = install_graceful_shutdown(store, (signal.SIGUSR2,))
        os.kill(os.getpid(), signal.SIGUSR2)
        assert handle.drained.wait(20)
        assert store.provenance_queue is None  # disabled: later writes are synchronous
        assert [e["n"] for e in store.get(records[1].id).provenance] == [1]
        handle.uninstall()
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_bad_calls_are_refused(store):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TypeError, match="MemoryStore"):
        install_graceful_shutdown(42)
    with pytest.raises(ValueError, match="cannot be caught"):
        install_graceful_shutdown(store, (signal.SIGKILL,))
    with pytest.raises(ValueError, match="no signals"):
        install_graceful_shutdown(store, ())
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, install_graceful_shutdown, store)))
    t.start()
    t.join(10)
    assert errors and "main thread" in str(errors[0].value)
    assert signal.getsignal(signal.SIGTERM) == before  # a refused call installs nothing
