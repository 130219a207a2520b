"""`megacontext serve --ray`: two engine replicas on Ray Serve over one store, as users run it.

The server runs in a subprocess (its own local Ray instance); a short helper process joins
that Ray cluster only to kill a replica's actor (`ray.kill`) the way a crash would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]')")

from megacontext_memory.serving.ray_app import REPLICA_HEADER, shard_for  # noqa: E402

pytestmark = pytest.mark.slow

REPLICAS, TURNS = 2, 3
HTTP_TIMEOUT = 120  # seconds, every request
START_TIMEOUT = 240  # seconds, Ray + both models

# Run in a process of its own against the server's cluster (the local instance requires
# its token, which a driver joining by address only sends when told to).
SERVE_ACTORS = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
names = ray.util.list_named_actors(all_namespaces=True)
names = sorted(a["name"] for a in names if a["namespace"] == "serve" and sys.argv[2] in a["name"])
if sys.argv[3] == "kill":
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"))
print(json.dumps(names))
"""


def _sessions() -> list[str]:
    """Four session ids, two owned by each replica (the affinity rule is deterministic)."""
    names, per = [], {i: 0 for i in range(REPLICAS)}
    for n in range(100):
        sid = f"ray-session-{n}"
        shard = shard_for(sid, REPLICAS)
        if per[shard] < 2:
            per[shard] += 1
            names.append(sid)
    assert len(names) == 4
    return names


class RayServer:
    """`megacontext serve --ray` in a subprocess, its log in a file (never a full pipe)."""

    def __init__(self, store: Path, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.log, self.proc = f"http://127.0.0.1:{self.port}", log, None
        self.gcs_address, self.store = "", store
        self.cmd = [sys.executable, "-m", "megacontext_memory.cli", "serve", "--ray"]
        self.cmd += ["--replicas", str(REPLICAS), "--store", str(store)]
        self.cmd += ["--port", str(self.port), "--budget", "256", "--max-tokens", "4"]
        self.cmd += ["--engine-option", "gist_refine_steps=0"]

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def start(self) -> RayServer:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.time() + START_TIMEOUT
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve --ray exited with {self.proc.returncode}: {self.tail()}")
            # The address of its Ray cluster is printed once the app runs.
            found = re.search(r"ray cluster (\S+)\)", self.log.read_text(errors="replace"))
            if found and all(self.ready(i) for i in range(REPLICAS)):
                self.gcs_address = found.group(1)
                return self
            time.sleep(1)
        raise TimeoutError(f"serve --ray did not answer within {START_TIMEOUT} s: {self.tail()}")

    def ready(self, replica: int) -> bool:
        try:
            status, _, headers = self.request("GET", f"/healthz?replica={replica}", timeout=5)
        except OSError:
            return False
        return status == 200 and headers.get(REPLICA_HEADER) == str(replica)

    def request(self, method: str, path: str, body=None, headers=None, timeout=HTTP_TIMEOUT):
        """(status, parsed JSON or bytes, lower-cased headers) of one request."""
        data = None if body is None else json.dumps(body).encode()
        h = {"Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, payload, hdrs = r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            status, payload, hdrs = e.code, e.read(), e.headers
        kind = hdrs.get("content-type", "")
        parsed = json.loads(payload) if kind.startswith("application/json") else payload
        return status, parsed, {k.lower(): v for k, v in hdrs.items()}

    def actors(self, marker: str, action: str = "list") -> list[str]:
        """The names of Serve's actors whose name holds `marker` (`action="kill"`: killed)."""
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        cmd = [sys.executable, "-c", SERVE_ACTORS, self.gcs_address, marker, action]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def stop(self, timeout: float = 90) -> int | None:
        """SIGTERM, then SIGKILL (its process group: Ray's own processes too) if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("served-ray")
    s = RayServer(root / "store", root / "serve.log")
    try:
        yield s.start()
    finally:
        s.stop()


class Conversation:
    """One session driven through the OpenAI-compatible endpoint, the list resent each turn."""

    def __init__(self, server: RayServer, sid: str):
        self.server, self.sid, self.messages, self.replicas = server, sid, [], []

    def say(self, text: str, deadline: float | None = None) -> str:
        """One turn; until `deadline`, a 503 (replica restarting) is retried."""
        messages = [*self.messages, {"role": "user", "content": text}]
        body = {"model": "megacontext", "messages": messages, "max_tokens": 4}
        while True:
            status, reply, headers = self.server.request(
                "POST", "/v1/chat/completions", body, {"X-Session-Id": self.sid}
            )
            if status == 503 and deadline is not None and time.time() < deadline:
                time.sleep(1)
                continue
            assert status == 200, (status, reply)
            break
        assert reply["session_id"] == self.sid
        self.replicas.append(headers[REPLICA_HEADER])
        content = reply["choices"][0]["message"]["content"]
        self.messages = [*messages, {"role": "assistant", "content": content}]
        return content

    def log(self) -> list[dict]:
        status, body, _ = self.server.request("GET", f"/v1/sessions/{self.sid}/messages")
        assert status == 200, body
        return body["messages"]


def _line(sid: str, turn: int) -> str:
    return f"Note {turn} for {sid}: my locker number is {len(sid) * 100 + turn}."


def _check_isolated(conversations: list[Conversation], turns: int) -> dict[str, list[dict]]:
    logs = {c.sid: c.log() for c in conversations}
    for sid, log in logs.items():
        users = [m["content"] for m in log if m["role"] == "user"]
        assert users == [_line(sid, t) for t in range(turns)]  # each once, in order
        assert sum(m["role"] == "assistant" for m in log) == turns
        others = [o for o in logs if o != sid]
        for m in log:
            assert not any(f"for {o}:" in m["content"] for o in others), (sid, m)
    return logs


def test_sessions_stick_to_one_replica_and_survive_a_replica_kill(server):
    t0 = time.time()
    conversations = [Conversation(server, sid) for sid in _sessions()]

    def drive(c: Conversation, turns: range) -> None:
        for t in turns:
            c.say(_line(c.sid, t), deadline=time.time() + 150)

    with ThreadPoolExecutor(len(conversations)) as pool:
        list(pool.map(lambda c: drive(c, range(TURNS)), conversations, timeout=300))

    # Affinity: every request of a session was served by the replica the rule names.
    for c in conversations:
        assert set(c.replicas) == {str(shard_for(c.sid, REPLICAS))}, (c.sid, c.replicas)
    assert {c.replicas[0] for c in conversations} == {"0", "1"}
    acknowledged = _check_isolated(conversations, TURNS)

    # Kill the actor of the replica that serves the first session; Serve starts a new one.
    marker = f"#shard-{conversations[0].replicas[0]}#"
    before = server.actors(marker, "kill")
    assert len(before) == 1, before

    # Every acknowledged message is still there; each session goes on on its replica.
    with ThreadPoolExecutor(len(conversations)) as pool:
        turn = range(TURNS, TURNS + 1)
        list(pool.map(lambda c: drive(c, turn), conversations, timeout=300))
    after = server.actors(marker)
    assert len(after) == 1 and after != before, (before, after)  # a new replica of the shard
    for c in conversations:
        assert set(c.replicas) == {str(shard_for(c.sid, REPLICAS))}, (c.sid, c.replicas)
    logs = _check_isolated(conversations, TURNS + 1)
    for sid, log in logs.items():
        assert log[: len(acknowledged[sid])] == acknowledged[sid]
    print(f"ray serve: {len(conversations)} sessions, {time.time() - t0:.0f} s")


def test_unnamed_requests_and_other_paths_reach_a_fixed_replica(server):
    from megacontext_memory.serving.ray_app import content_key, session_key

    # An unnamed conversation keeps its key (and so its replica) while it grows.
    first = {"messages": [{"role": "user", "content": "hi"}]}
    grown = {"messages": [*first["messages"], {"role": "assistant", "content": "hello"}]}
    assert content_key(first) == content_key(grown)
    assert session_key("POST", "/v1/chat/completions", {}, json.dumps(first).encode()) == (
        content_key(first)
    )
    body = json.dumps({**first, "user": "u-1"}).encode()
    assert session_key("POST", "/v1/chat/completions", {}, body) == "u-1"
    assert session_key("POST", "/v1/chat/completions", {"x-session-id": "h"}, body) == "h"
    assert session_key("GET", "/v1/sessions/abc/export", {}, b"") == "abc"
    assert session_key("GET", "/healthz", {}, b"") is None

    status, reply, headers = server.request(
        "POST", "/v1/chat/completions", first | {"max_tokens": 2}
    )
    assert status == 200, reply
    assert headers[REPLICA_HEADER] == str(shard_for(content_key(first), REPLICAS))
    # A streamed reply passes through the ingress as server-sent events.
    body = {"messages": [{"role": "user", "content": "Count to three."}], "max_tokens": 4}
    status, events, headers = server.request(
        "POST", "/v1/chat/completions", body | {"stream": True}, {"X-Session-Id": "ray-stream"}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers[REPLICA_HEADER] == str(shard_for("ray-stream", REPLICAS))
    lines = [x for x in events.decode().splitlines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["session_id"] == "ray-stream"

    status, _, headers = server.request("GET", "/v1/models")
    assert status == 200 and headers[REPLICA_HEADER] == "0"
    status, body, _ = server.request("GET", f"/healthz?replica={REPLICAS}")
    assert status == 400, body


def test_sigterm_shuts_down_cleanly(server):
    """Every replica closes its engine as Serve stops it, so the store's write-ahead log
    is folded into the index before the server exits."""
    assert server.store.joinpath("index.db-wal").exists()
    assert server.stop() == 0, server.tail()
    assert not server.store.joinpath("index.db-wal").exists(), server.tail()
