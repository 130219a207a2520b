"""`megacontext serve` in a subprocess on a free localhost port: for tests, benchmarks and
examples that talk to a real server the way clients do."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class ServerProcess:
    """A served engine over `store`; `with ServerProcess(...) as s:` starts and stops it."""

    def __init__(
        self,
        store: str | Path,
        *,
        budget: int = 1024,
        api_key: str | None = None,
        max_tokens: int | None = None,
        device: str | None = None,
        options: list[str] = (),
    ):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.store, self.url, self.proc = Path(store), f"http://127.0.0.1:{self.port}", None
        self.api_key = api_key
        cmd = [sys.executable, "-m", "megacontext_memory.cli", "serve", "--store", str(store)]
        cmd += ["--port", str(self.port), "--budget", str(budget)]
        cmd += ["--api-key", api_key] if api_key else []
        cmd += ["--max-tokens", str(max_tokens)] if max_tokens else []
        cmd += ["--device", device] if device else []
        for option in options:
            cmd += ["--engine-option", option]
        self.cmd = cmd

    def start(self, timeout: float = 600) -> ServerProcess:
        """Start the server and wait until it answers /healthz."""
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.proc.stderr.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"megacontext serve exited with {self.proc.returncode}: {tail}")
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        self.stop(signal.SIGKILL)
        raise TimeoutError(f"megacontext serve did not answer within {timeout} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it with `sig` (SIGKILL: as a crash would) and wait for it to exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def log(self, session_id: str) -> list[tuple[str, str]] | None:
        """A session's stored log as (role, content) pairs; None when there is no such
        session (what tests check after driving the server as a client would)."""
        req = urllib.request.Request(f"{self.url}/v1/sessions/{session_id}/messages")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise
        return [(m["role"], m["content"]) for m in body["messages"]]

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
