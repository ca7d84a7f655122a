"""``iai-queue serve``, driven by the official MCP client over stdio, in a subprocess."""

import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from iai_queue import MemoryStore

DIM = 32
TEXTS = [f"memory {i}: the {animal} likes {food}" for i, (animal, food) in enumerate(
    [(a, f) for a in ("cat", "dog", "owl", "fox", "eel") for f in ("fish", "bread", "mice", "rice")])]


def server_params(tmp_path: Path, *extra: str, coalesce_ms: str = "60000") -> StdioServerParameters:
    env = {"HOME": str(tmp_path / "home"), "IAI_QUEUE_SPILL_DIR": str(tmp_path / "spill"),
           # Entries stay in memory until a flush or stop: what the stop must not lose.
           "IAI_QUEUE_COALESCE_MS": coalesce_ms, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return StdioServerParameters(command=sys.executable, env=env, cwd=str(tmp_path),
                                 args=["-m", "iai_queue", "serve", "--store", str(tmp_path / "db"), "--dim", str(DIM),
                                       *extra])


async def call(client, tool, args=None):
    result = await client.call_tool(tool, args or {}, read_timeout_seconds=30)
    assert not result.is_error, result.content
    return result.structured_content


def provenance_keys(store, ids):
    """(record id, cue, session) of every provenance entry of ``ids``, counted."""
    out = Counter()
    for rid in ids:
        for e in store.get(rid).provenance:
            out[(str(rid), e["cue"], e["session_id"])] += 1
    return out


def expected_keys(recalls):
    return Counter((h["id"], cue, sid) for cue, sid, hits in recalls for h in hits)


def wait_gone(pid, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(90)
def test_concurrent_recalls_toggles_and_sigterm_lose_nothing(tmp_path):
    errlog_path = tmp_path / "server.log"
    recalls = []  # (cue, session_id, hits) of every recall that returned
    state = {}

    async def main():
        with open(errlog_path, "w") as errlog:
            async with Client(stdio_client(server_params(tmp_path), errlog=errlog)) as client:
                ids = [(await call(client, "memory_insert", {"text": t}))["id"] for t in TEXTS]
                state["ids"] = ids

                async def recaller(n):
                    for i in range(12):
                        cue, sid = f"cat fish {n}-{i}", f"session-{n}"
                        out = await call(client, "memory_recall", {"cue": cue, "session_id": sid, "k": 3})
                        recalls.append((cue, sid, out["hits"]))

                async def toggler():
                    for i in range(6):
                        await call(client, "queue_disable" if i % 2 == 0 else "queue_enable")
                        await anyio.sleep(0.01)

                async with anyio.create_task_group() as tg:
                    for n in range(6):
                        tg.start_soon(recaller, n)
                    tg.start_soon(toggler)

                status = await call(client, "queue_status")
                assert status["enabled"] is True  # the toggler's last call enabled it
                for n in range(4):  # these wait in memory (60 s coalescing) until the stop
                    cue, sid = f"owl mice late-{n}", "late"
                    recalls.append((cue, sid, (await call(client, "memory_recall",
                                                          {"cue": cue, "session_id": sid, "k": 3}))["hits"]))
                status = await call(client, "queue_status")
                assert status["stats"]["pending"] > 0, status
                state["pid"] = status["pid"]
                os.kill(status["pid"], signal.SIGTERM)
                assert await anyio.to_thread.run_sync(wait_gone, status["pid"])

    anyio.run(main)
    log = errlog_path.read_text()
    assert "shutdown.drained" in log, log
    assert not (tmp_path / "spill").exists() or not list((tmp_path / "spill").glob("*.jsonl"))

    store = MemoryStore(tmp_path / "db", dim=DIM)
    assert store.count() == len(TEXTS)
    expected = expected_keys(recalls)
    assert len(recalls) == 6 * 12 + 4 and sum(expected.values()) > 0
    assert provenance_keys(store, state["ids"]) == expected  # every recall's provenance, exactly once
    assert store.provenance_rows() == sum(expected.values())  # and no duplicate rows behind get()'s view


@pytest.mark.timeout(60)
def test_stdin_closing_drains_the_queue(tmp_path):
    recalls = []

    async def main():
        async with Client(stdio_client(server_params(tmp_path), errlog=open(os.devnull, "w"))) as client:
            ids = [(await call(client, "memory_insert", {"text": t}))["id"] for t in TEXTS[:6]]
            for i in range(5):
                cue = f"dog bread {i}"
                recalls.append((cue, "s", (await call(client, "memory_recall",
                                                      {"cue": cue, "session_id": "s", "k": 2}))["hits"]))
            assert (await call(client, "queue_status"))["stats"]["pending"] == 10
            got = await call(client, "memory_get", {"id": ids[0]})
            assert got["text"] == TEXTS[0]
            return ids
        # leaving the client closes the server's stdin: the MCP way to stop a stdio server

    ids = anyio.run(main)
    store = MemoryStore(tmp_path / "db", dim=DIM)
    assert provenance_keys(store, ids) == expected_keys(recalls)
    assert store.provenance_rows() == 10


@pytest.mark.timeout(60)
def test_tools_report_bad_input_and_flush_and_get_show_provenance(tmp_path):
    async def main():
        async with Client(stdio_client(server_params(tmp_path, coalesce_ms="50"),
                                       errlog=open(os.devnull, "w"))) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert tools == {"memory_insert", "memory_recall", "memory_get", "queue_status", "queue_enable",
                             "queue_disable", "queue_flush"}
            rid = (await call(client, "memory_insert", {"text": "the owl eats mice",
                                                        "id": "3f0c2a4e-0000-4000-8000-000000000001"}))["id"]
            dup = await client.call_tool("memory_insert", {"text": "again", "id": rid})
            assert dup.is_error and "already in the store" in dup.content[0].text
            bad = await client.call_tool("memory_get", {"id": "not-a-uuid"})
            assert bad.is_error and "not a UUID" in bad.content[0].text
            bad = await client.call_tool("memory_recall", {"cue": "owl", "k": 0})
            assert bad.is_error and "k must be" in bad.content[0].text
            hits = (await call(client, "memory_recall", {"cue": "owl mice", "session_id": "s9"}))["hits"]
            assert [h["id"] for h in hits] == [rid]
            assert (await call(client, "queue_flush", {"timeout_s": 10}))["flushed"] is True
            got = await call(client, "memory_get", {"id": rid})
            assert [(p["cue"], p["session_id"]) for p in got["provenance"]] == [("owl mice", "s9")]
            off = await call(client, "queue_disable")
            assert off["enabled"] is False and off["stats"] is None
            await call(client, "memory_recall", {"cue": "owl", "session_id": "sync"})
            got = await call(client, "memory_get", {"id": rid})  # written synchronously: there already
            assert [p["session_id"] for p in got["provenance"]] == ["s9", "sync"]

    anyio.run(main)


def test_serve_usage_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch):
    from iai_queue.cli import main

    (tmp_path / "afile").write_text("x")
    cases = [
        (["--store", str(tmp_path / "afile")], None, "is a file"),
        (["--store", str(tmp_path / "db"), "--embedder", "no_such_module_xyz:embed"], None, "cannot import"),
        (["--store", str(tmp_path / "db"), "--embedder", "iai_queue"], None, "module:callable"),
        (["--store", str(tmp_path / "db"), "--embedder", "iai_queue.embedding:check_embedding"], None, "returned"),
        (["--store", str(tmp_path / "db"), "--dim", "1"], None, "--dim"),
        (["--store", str(tmp_path / "db")], {"IAI_QUEUE_MAX_QUEUE_SIZE": "lots"}, "IAI_QUEUE_MAX_QUEUE_SIZE='lots'"),
        (["--store", ""], None, "--store"),
        # A review's finds: these were tracebacks (and the first created a directory under a file).
        (["--store", str(tmp_path / "afile" / "db")], None, "cannot open the store"),
        (["--store", str(tmp_path / "db"), "--embedder", "os:getcwd"], None, "failed on a probe text"),
        (["--store", "ftp://host/db"], None, "unsupported scheme 'ftp'"),
        ([], {"IAI_QUEUE_STORE": "ftp://host/db"}, "unsupported scheme 'ftp'"),
        (["--store", str(tmp_path / "db")], {"IAI_QUEUE_MAINTENANCE": "sometimes"}, "IAI_QUEUE_MAINTENANCE='sometimes'"),
    ]
    MemoryStore(tmp_path / "db16", dim=16)
    cases.append((["--store", str(tmp_path / "db16"), "--dim", "32"], None, "holds 16-d embeddings"))
    for argv, env, needle in cases:
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        code = main(["serve", *argv])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
        for k in env or {}:
            monkeypatch.delenv(k)
    assert not (tmp_path / "db").exists()  # nothing was created by a refused start


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how,code", [("sigint", 130), ("eof", 0)])
def test_serve_exits_cleanly_on_sigint_and_on_stdin_eof(tmp_path, how, code):
    import subprocess

    env = {**os.environ, "HOME": str(tmp_path), "IAI_QUEUE_SPILL_DIR": str(tmp_path / "spill")}
    proc = subprocess.Popen([sys.executable, "-m", "iai_queue", "serve", "--store", str(tmp_path / "db"),
                             "--dim", "16"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    try:
        line = proc.stderr.readline()  # the server logs "serving ..." once it is up
        assert "serving" in line, line + proc.stderr.read()
        if how == "sigint":
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
            err = proc.stderr.read()
        else:
            _, err = proc.communicate(input="", timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    if how == "sigint":
        assert "shutdown.drained" in err


@pytest.mark.timeout(60)
def test_serve_exits_on_sigint_while_serving_a_session(tmp_path):
    """SIGINT once the stdio session runs (its reader on an anyio worker thread): the interrupt tears
    the event loop down, and the process must still end, not wait for that thread at exit."""
    import json
    import subprocess

    env = {**os.environ, "HOME": str(tmp_path), "IAI_QUEUE_SPILL_DIR": str(tmp_path / "spill")}
    proc = subprocess.Popen([sys.executable, "-m", "iai_queue", "serve", "--store", str(tmp_path / "db"),
                             "--dim", "16"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    try:
        assert "serving" in proc.stderr.readline()
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "test", "version": "0"}}}) + "\n")
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())  # the session is up
        assert reply["id"] == 1 and "result" in reply, reply
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "shutdown.drained" in err


@pytest.mark.timeout(60)
def test_streamable_http_transport_and_sigterm_drain(tmp_path):
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HOME": str(tmp_path), "IAI_QUEUE_SPILL_DIR": str(tmp_path / "spill"),
           "IAI_QUEUE_COALESCE_MS": "60000"}
    proc = subprocess.Popen([sys.executable, "-m", "iai_queue", "serve", "--store", str(tmp_path / "db"), "--dim",
                             str(DIM), "--transport", "streamable-http", "--port", str(port)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    recalls = []

    async def main():
        for _ in range(150):  # uvicorn binds a moment after the "serving" line
            try:
                async with Client(f"http://127.0.0.1:{port}/mcp") as client:
                    rid = (await call(client, "memory_insert", {"text": "the fox eats rice"}))["id"]
                    for i in range(3):
                        recalls.append((f"fox {i}", "http", (await call(client, "memory_recall", {
                            "cue": f"fox {i}", "session_id": "http", "k": 1}))["hits"]))
                    assert (await call(client, "queue_status"))["stats"]["pending"] == 3
                    return rid
            except OSError:
                await anyio.sleep(0.1)
            except BaseExceptionGroup as group:  # a refused connection, raised from the client's task group
                if not group.subgroup(OSError):
                    raise
                await anyio.sleep(0.1)
        raise AssertionError("the HTTP server never answered")

    try:
        assert "serving" in proc.stderr.readline()
        rid = anyio.run(main)
        proc.send_signal(signal.SIGTERM)  # uvicorn stops, then hands the signal on: drain, then die by SIGTERM
        proc.wait(30)
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, err
    assert "shutdown.drained" in err
    store = MemoryStore(tmp_path / "db", dim=DIM)
    assert provenance_keys(store, [rid]) == expected_keys(recalls)
    assert store.provenance_rows() == 3


@pytest.mark.timeout(90)
def test_serve_on_object_storage(tmp_path, s3_uri, s3_options):
    """``--store s3://…`` with ``--storage-option``s (a review found ``serve`` took the URI for a local
    path): the MCP client inserts, recalls and flushes against a real S3-compatible server."""
    params = server_params(tmp_path, coalesce_ms="50")
    params.args[params.args.index("--store") + 1] = s3_uri
    for key, value in s3_options.items():
        params.args += ["--storage-option", f"{key}={value}"]

    async def main():
        async with Client(stdio_client(params, errlog=open(os.devnull, "w"))) as client:
            rid = (await call(client, "memory_insert", {"text": "the owl eats mice"}))["id"]
            hits = (await call(client, "memory_recall", {"cue": "owl mice", "session_id": "s3"}))["hits"]
            assert [h["id"] for h in hits] == [rid]
            assert (await call(client, "queue_flush", {"timeout_s": 30}))["flushed"] is True
            return rid

    rid = anyio.run(main)
    store = MemoryStore(s3_uri, dim=DIM, storage_options=s3_options)
    assert [(p["cue"], p["session_id"]) for p in store.get(rid).provenance] == [("owl mice", "s3")]
    assert store.provenance_rows() == 1
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir())  # no local directory named after the URI
