"""What a new user tripped on: env options, duplicate ids, the live-queue handle, numpy cues, packaging."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import iai_queue
from iai_queue import DuplicateIdError, MemoryRecord, MemoryStore, dispatch
from iai_queue.envconfig import QUEUE_ENV_OPTIONS, EnvConfigError, queue_options_from_env, resolve_queue_options

from conftest import DIM, make_records


# -- IAI_QUEUE_* environment -----------------------------------------------------------


def test_env_options_parse_and_explicit_arguments_win(monkeypatch, store, tmp_path):
    monkeypatch.setenv("IAI_QUEUE_COALESCE_MS", "7.5")
    monkeypatch.setenv("IAI_QUEUE_MAX_QUEUE_SIZE", "12")
    monkeypatch.setenv("IAI_QUEUE_SPILL_DIR", str(tmp_path / "envspill"))
    monkeypatch.setenv("IAI_QUEUE_EXIT_TIMEOUT", " ")  # blank: not configured
    assert queue_options_from_env() == {"coalesce_ms": 7.5, "max_queue_size": 12, "spill_dir": tmp_path / "envspill"}
    assert resolve_queue_options({"coalesce_ms": 3, "max_batch_pairs": None})["coalesce_ms"] == 3

    q = store.enable_provenance_queue(max_queue_size=99)
    try:
        assert q.coalesce_s == pytest.approx(0.0075) and q.max_queue_size == 99
        assert q.spill_dir == tmp_path / "envspill"
    finally:
        store.disable_provenance_queue()


def test_every_queue_option_has_a_variable_that_the_queue_accepts(monkeypatch, store, tmp_path):
    import inspect

    from iai_queue import ProvenanceWriteQueue

    params = set(inspect.signature(ProvenanceWriteQueue.__init__).parameters) - {"self", "store"}
    assert set(QUEUE_ENV_OPTIONS) == params
    values = {"coalesce_ms": "5", "spill_dir": str(tmp_path / "s"), "exit_timeout": "1", "retry_initial_s": "0.01",
              "retry_max_s": "0.5", "idle_replay_s": "2", "durability": "memory"}
    for option in QUEUE_ENV_OPTIONS:
        monkeypatch.setenv(f"IAI_QUEUE_{option.upper()}", values.get(option, "64"))
    q = ProvenanceWriteQueue(store, **queue_options_from_env())
    assert (q.max_batch_pairs, q.max_memory_pairs, q.spill_file_pairs, q.retry_max_s) == (64, 64, 64, 0.5)


def test_a_queue_built_directly_reads_the_environment_too(monkeypatch, store):
    from iai_queue import ProvenanceWriteQueue

    monkeypatch.setenv("IAI_QUEUE_MAX_BATCH_PAIRS", "7")
    monkeypatch.setenv("IAI_QUEUE_COALESCE_MS", "3")
    q = ProvenanceWriteQueue(store, coalesce_ms=20)
    assert q.max_batch_pairs == 7 and q.coalesce_s == pytest.approx(0.020)  # the explicit argument wins
    monkeypatch.setenv("IAI_QUEUE_RETRY_MAX_S", "soon")
    with pytest.raises(EnvConfigError, match="IAI_QUEUE_RETRY_MAX_S='soon'"):
        ProvenanceWriteQueue(store)


@pytest.mark.parametrize("name,value", [("IAI_QUEUE_COALESCE_MS", "fast"), ("IAI_QUEUE_COALESCE_MS", "-1"),
                                        ("IAI_QUEUE_EXIT_TIMEOUT", "nan"), ("IAI_QUEUE_MAX_QUEUE_SIZE", "0"),
                                        ("IAI_QUEUE_MAX_BATCH_PAIRS", "2.5"),
                                        # a review's finds: past a year, a wait raised in stop() or the worker
                                        ("IAI_QUEUE_EXIT_TIMEOUT", "1e10"), ("IAI_QUEUE_COALESCE_MS", "1e300")])
def test_a_bad_env_value_is_named(monkeypatch, store, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(EnvConfigError, match=f"{name}='{value}'"):
        store.enable_provenance_queue()
    assert store.provenance_queue is None


@pytest.mark.parametrize("option", ["coalesce_ms", "exit_timeout", "retry_initial_s", "retry_max_s",
                                    "idle_replay_s", "fsync_interval_ms"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e12, -1.0, True])
def test_a_time_option_must_be_a_number_from_0_to_a_year(store, option, value):
    """A review's find: NaN, inf and huge times were accepted as arguments, then a worker thread crashed
    on every restart (coalesce_ms=inf) or stop() raised OverflowError (exit_timeout=1e10)."""
    from iai_queue import ProvenanceWriteQueue

    with pytest.raises(ValueError, match=f"{option} must be a number from 0 to .*, got {value!r}"):
        ProvenanceWriteQueue(store, **{option: value})


@pytest.mark.parametrize("option", ["idle_s", "poll_s", "window_s"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e-300, 0, True])
def test_a_maintenance_time_must_be_a_number_from_a_millisecond_to_a_year(option, value):
    """A review's find: poll_s=inf killed the maintenance thread silently (an OverflowError outside its
    try), NaN passed as a time."""
    from iai_queue.maintenance import MaintenancePolicy

    with pytest.raises(ValueError, match=f"{option} must be a number of seconds from 0.001 to a year, got"):
        MaintenancePolicy(**{option: value})


def test_an_empty_maintenance_variable_is_unset_and_a_bad_one_is_named(monkeypatch):
    from iai_queue.maintenance import MaintenancePolicy, MaintenanceRole

    monkeypatch.setenv("IAI_QUEUE_MAINTENANCE", "  ")
    assert MaintenancePolicy.from_env().role is MaintenanceRole.AUTO  # empty counts as unset, as for every variable
    monkeypatch.setenv("IAI_QUEUE_MAINTENANCE", " Sometimes")
    with pytest.raises(ValueError, match="IAI_QUEUE_MAINTENANCE=' Sometimes': expected auto, always or never"):
        MaintenancePolicy.from_env()


# -- the live queue ------------------------------------------------------------------------


def test_provenance_queue_property_and_enable_with_other_options_warns(store, records, tmp_path, caplog):
    assert store.provenance_queue is None
    q = store.enable_provenance_queue(coalesce_ms=5, spill_dir=tmp_path / "spill")
    try:
        assert store.provenance_queue is q is store._provenance_queue
        with caplog.at_level(logging.WARNING, logger="iai_queue"):
            assert store.enable_provenance_queue(coalesce_ms=5, spill_dir=str(tmp_path / "spill")) is q
            assert not caplog.records  # the same options: silent
            again = store.enable_provenance_queue(coalesce_ms=999, max_queue_size=1)
        assert again is q and q.coalesce_s == 0.005 and q.max_queue_size == 4096  # not applied
        (rec,) = [r for r in caplog.records if getattr(r, "event", None) == "enable.options_ignored"]
        assert "coalesce_ms=999 (live: 5)" in rec.options and "max_queue_size=1 (live: 'default')" in rec.options
    finally:
        store.disable_provenance_queue()
    q2 = store.enable_provenance_queue(coalesce_ms=999, spill_dir=tmp_path / "spill")  # disable, enable: applied
    assert q2 is not q and q2.coalesce_s == 0.999
    store.disable_provenance_queue()


def test_dispatch_takes_a_numpy_cue(store, records):
    cue = np.asarray(records[3].embedding, dtype=np.float32)
    hits = dispatch(store, "memory_recall", {"cue": "np", "session_id": "s", "cue_embedding": cue, "k": 1})
    assert hits[0]["id"] == records[3].id
    assert [e["cue"] for e in store.get(records[3].id).provenance] == ["np"]
    with pytest.raises(ValueError, match=r"1-d, got an array of shape \(1, 8\)"):
        dispatch(store, "memory_recall", {"cue": "np", "session_id": "s", "cue_embedding": cue[None, :]})


def test_adispatch_takes_a_numpy_cue(store, records):
    import anyio

    from iai_queue import adispatch

    cue = np.asarray(records[2].embedding)
    hits = anyio.run(adispatch, store, "memory_recall", {"cue": "np", "session_id": "s", "cue_embedding": cue, "k": 1})
    assert hits[0]["id"] == records[2].id


# -- duplicate ids -----------------------------------------------------------------------------


def test_a_duplicate_id_is_refused_and_nothing_is_inserted(store, records):
    fresh = make_records(3, seed=99)
    with pytest.raises(DuplicateIdError, match=str(records[0].id)) as info:
        store.insert_many([*fresh, MemoryRecord(id=records[0].id, text="again", embedding=[0.0] * DIM)])
    assert info.value.ids == [records[0].id]
    with pytest.raises(DuplicateIdError):
        store.insert_many([fresh[0], fresh[0]])  # twice in one call
    assert store.count() == len(records)  # nothing from either call
    assert store.existing_ids([r.id for r in fresh] + [records[1].id]) == {records[1].id}
    store.insert_many(fresh)
    assert store.count() == len(records) + 3
    with pytest.raises(DuplicateIdError):
        MemoryStore(store.path, dim=DIM).insert(fresh[1])  # another handle on the store sees it too


# -- packaging and logging ---------------------------------------------------------------------


def test_package_ships_py_typed_and_exports_the_operator_functions():
    assert (Path(iai_queue.__file__).parent / "py.typed").is_file()
    for name in ("spill_status", "inspect_file", "requeue", "install_graceful_shutdown", "DuplicateIdError"):
        assert name in iai_queue.__all__ and callable(getattr(iai_queue, name))
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("iai_queue").handlers)


def test_no_bare_warnings_on_stderr_when_the_host_configured_no_logging(tmp_path):
    code = ("import logging, iai_queue\n"
            "logging.getLogger('iai_queue.queue').warning('write.failed should not reach stderr')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""


# -- no fcntl (Windows) ------------------------------------------------------------------------

_NO_FCNTL_CHILD = r'''
import sys, threading, uuid, logging
sys.modules["fcntl"] = None  # as on Windows: "import fcntl" raises ImportError
import iai_queue
from iai_queue import MemoryRecord, MemoryStore, ProvenanceWriteQueue, dispatch
logging.basicConfig(level=logging.WARNING)

db, spill = sys.argv[1], sys.argv[2]
store = MemoryStore(db, dim=4)
recs = [MemoryRecord(id=uuid.uuid4(), text=f"r{i}", embedding=[float(i), 1.0, 0.0, 0.5]) for i in range(3)]
store.insert_many(recs)
store.enable_provenance_queue(spill_dir=spill, coalesce_ms=1)
hits = dispatch(store, "memory_recall", {"cue": "c", "session_id": "s", "cue_embedding": [1.0, 1.0, 0.0, 0.5], "k": 3})
assert store.provenance_queue.flush(5)
store.disable_provenance_queue()
assert all(store.get(h["id"]).provenance for h in hits)

# Overflow: spilling cannot lock, so it fails like a full disk: counted, kept in memory, nothing dropped.
gate = threading.Event()
real = store.append_provenance_batch
def blocked(pairs, records_cache=None):
    gate.wait(10)
    return real(pairs, records_cache=records_cache)
store.append_provenance_batch = blocked
q = ProvenanceWriteQueue(store, spill_dir=spill, max_queue_size=1, max_batch_pairs=1, max_memory_pairs=50,
                         retry_initial_s=0.01, retry_max_s=0.05).start()
for n in range(6):
    q.enqueue([(recs[0].id, {"n": n})])
import time
deadline = time.monotonic() + 5
while q.stats().spill_errors == 0 and time.monotonic() < deadline:
    time.sleep(0.01)
assert q.stats().spill_errors >= 1, q.stats()
gate.set()
assert q.flush(10), q.stats()
q.stop()
s = q.stats()
assert s.dropped == 0 and s.written == 6, s
assert [e["n"] for e in store.get(recs[0].id).provenance if "n" in e] == list(range(6))
print("ok")
'''


@pytest.mark.timeout(60)
def test_import_and_memory_mode_work_without_fcntl(tmp_path):
    """Where fcntl does not exist the package imports, memory mode works, and spilling fails loudly, losing nothing."""
    out = subprocess.run([sys.executable, "-c", _NO_FCNTL_CHILD, str(tmp_path / "db"), str(tmp_path / "spill")],
                         capture_output=True, text=True, timeout=50)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
    assert "POSIX file locks" in out.stderr  # the spill failure says why
