"""`megacontext serve --ray`: the same app on Ray Serve, N engine replicas over one store.

Layout. One Serve application, `megacontext`, of N + 1 deployments:

- `shard-0` ... `shard-{N-1}`: one replica each, each owning one engine (the model loaded
  once per replica) and the FastAPI app of `app.py` unchanged, over the SAME store
  directory (SQLite, file locks and per-session turn locks hold across processes);
- `ingress`: a small deployment without a model that receives every HTTP request from
  Serve's proxy, names the session it belongs to, and forwards it whole (method, path,
  headers, body) to the shard that owns that session; the reply comes back as a stream
  (server-sent events pass through piece by piece) with the header `X-MegaContext-Replica`
  naming the shard that served it.

All of it runs on one node, a Ray instance `megacontext serve --ray` starts itself: the
store's SQLite runs in WAL mode, which needs every process that opens it on one host (the
README's "Scale-out on Ray Serve" says how this grows past one node).

Affinity rule. A session belongs to shard `shard_for(key, N)`: rendezvous (highest random
weight) hashing of the session key with blake2b, a pure function of the key and N. The key
is, as `app.py` reads it:

- `POST /v1/chat/completions`: the `X-Session-Id` header, else the body's `user` field;
  a request naming neither (routed by content inside the app) is keyed by the digest of
  its system texts and its first non-system message, which a client that resends the
  conversation sends unchanged every turn, so a conversation keeps its shard. (The app's
  content routing itself reads routing tables in the shared store, so a trimmed window
  that lands on another shard still finds its session; it only loses the warm replica.)
- `/v1/sessions/{id}/...` and `DELETE /v1/sessions/{id}`: `{id}`.
- anything else (`/healthz`, `/metrics`, `/v1/models`): shard 0, or the shard the query
  parameter `replica=I` names (per-replica health checks and Prometheus scrapes).

Why not Ray Serve's model multiplexing (`serve.multiplexed`, keyed by the
`serve_multiplexed_model_id` header)? It is a preference, not a rule: the router sends a
request to a replica that reports the id loaded, but falls back to others once that replica
is busy past a short matching timeout (`RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S`,
one second; a CPU turn takes longer), two first requests race before any replica reports
the id, and a replica evicts ids past `max_num_models_per_replica`. Ray's experimental
consistent-hash request router keys on a header only (not `user`, not content) and
rebuilds its ring from replica ids, so a restarted replica (a new id) moves sessions
between the live ones. Here the owner is fixed by (key, N): a restarted shard keeps its
index and so its sessions, several ingress replicas agree without talking to each other,
and adding a shard moves only the sessions whose highest weight is now the new shard
(about 1/(N+1) of them).

Safety does not rest on affinity alone. Affinity keeps a session's turns on one engine
(its working context stays warm, no two replicas hold it in memory at once); the store's
cross-process turn lock is what guarantees no two processes ever write one session at
once, also while N changes or after a restart. A message is acknowledged (the request
answered) only after the store has committed it, so killing a replica loses nothing that
was acknowledged; Serve starts a new replica of the same shard, which opens the store
again, and until it answers the ingress returns 503 for that shard's in-flight requests
(new ones wait in Serve's queue for the replica) and the other shards carry on.
"""

# No `from __future__ import annotations`: Serve rebuilds the ingress route's signature
# and FastAPI must see `Request` itself, not its name.
import asyncio
import hashlib
import json
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

APP_NAME = "megacontext"
REPLICA_HEADER = "x-megacontext-replica"
SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)(?:/|$)")
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive"}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
DEFAULT_MAX_BODY = 4 * 1024 * 1024


def shard_for(key: str, shards: int) -> int:
    """The shard that owns session key `key` among `shards` (rendezvous hashing)."""

    def weight(i: int) -> bytes:
        return hashlib.blake2b(f"{i}\x1f{key}".encode(), digest_size=8).digest()

    return max(range(shards), key=weight)


def content_key(body: dict) -> str:
    """The key of an unnamed chat request: its system texts and first non-system message."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    systems, first = [], None
    for m in messages:
        if not isinstance(m, dict):
            continue
        if m.get("role") in ("system", "developer"):
            systems.append(m.get("content"))
        elif first is None:
            first = [m.get("role"), m.get("content"), m.get("tool_calls")]
    text = json.dumps([systems, first], sort_keys=True, default=str)
    return "content:" + hashlib.sha256(text.encode()).hexdigest()


def session_key(method: str, path: str, headers: dict[str, str], body: bytes) -> str | None:
    """The session a request belongs to (see the module docstring); None: no session."""
    if m := SESSION_PATH.match(path):
        return m.group(1)
    if method == "POST" and path.rstrip("/") == "/v1/chat/completions":
        if headers.get("x-session-id"):
            return headers["x-session-id"]
        try:
            parsed = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return ""  # the shard answers the 400
        if not isinstance(parsed, dict):
            return ""
        if isinstance(parsed.get("user"), str) and parsed["user"]:
            return parsed["user"]
        return content_key(parsed)
    return None


def _error(status: int, message: str, kind: str = "server_error", **headers) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers or None)


class Shard:
    """One replica: an engine over the shared store and the app of `app.py`, driven over
    ASGI in-process for each request the ingress forwards."""

    def __init__(
        self,
        index: int,
        store: str,
        engine_options: dict[str, Any],
        app_options: dict[str, Any],
        threads: int | None = None,
    ):
        import torch

        if threads:
            torch.set_num_threads(threads)
        from ..engine import MegaContextEngine
        from .app import create_app

        self.index = index
        self.engine = MegaContextEngine(store=store, **engine_options)
        self.app = create_app(self.engine, **app_options)
        self._tasks: set[asyncio.Task] = set()

    def __del__(self) -> None:
        """Serve calls this once as the replica stops, after its requests in flight: the
        store's connections close, so SQLite folds its write-ahead log into the index."""
        engine = getattr(self, "engine", None)  # None when __init__ failed
        if engine is not None:
            engine.close()

    async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes):
        """The app's answer to one request: {"status", "headers"} first, then body bytes."""
        sent: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        end = object()
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()  # the caller went away (or the answer is complete)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await sent.put(message)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            except Exception as e:  # answered below unless a response was started
                await sent.put({"type": "error", "error": e})
            finally:
                await sent.put(end)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query,
            "headers": [(bytes(k), bytes(v)) for k, v in headers],
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
        }
        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        replica = (REPLICA_HEADER, str(self.index))
        try:
            first = await sent.get()
            if first is end or first["type"] != "http.response.start":
                error = first.get("error") if isinstance(first, dict) else None
                answer = {"error": {"message": f"{type(error).__name__}: {error}", "code": 500}}
                yield {"status": 500, "headers": [("content-type", "application/json"), replica]}
                yield json.dumps(answer).encode()
                return
            names = [
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in first.get("headers", [])
            ]
            yield {"status": first["status"], "headers": [*names, replica]}
            while (message := await sent.get()) is not end:
                if message["type"] != "http.response.body":
                    continue
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body"):
                    break
        finally:
            gone.set()


async def _rest(reply):
    try:
        async for piece in reply:
            yield piece
    finally:
        reply.cancel()  # the client went away: the shard sees a disconnect


# Serve freezes this app (and the route below, with the globals it sees) when the class is
# decorated: whatever the route uses is defined above it.
ingress_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@serve.ingress(ingress_app)
class Ingress:
    """Names each request's session and forwards it to the shard that owns it."""

    def __init__(self, shards: list, max_body_bytes: int = DEFAULT_MAX_BODY):
        self.shards, self.max_body_bytes = shards, max_body_bytes

    def pick(self, request: Request, body: bytes) -> int:
        headers = {k.lower(): v for k, v in request.headers.items()}
        key = session_key(request.method, request.url.path, headers, body)
        if key is not None:
            return shard_for(key, len(self.shards))
        chosen = request.query_params.get("replica", "0")
        if not chosen.isdigit() or int(chosen) >= len(self.shards):
            raise ValueError(f"replica {chosen!r} is not one of 0..{len(self.shards) - 1}")
        return int(chosen)

    @ingress_app.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def forward(self, path: str, request: Request) -> Response:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            return _error(
                413, f"request body over {self.max_body_bytes} bytes", "invalid_request_error"
            )
        body = await request.body()
        try:
            index = self.pick(request, body)
        except ValueError as e:
            return _error(400, str(e), "invalid_request_error")
        call = self.shards[index].options(stream=True).forward
        reply = call.remote(
            request.method,
            request.url.path,
            request.scope.get("query_string", b""),
            list(request.scope["headers"]),
            body,
        )
        try:
            start = await reply.__anext__()
            headers = [(k, v) for k, v in start["headers"] if k.lower() not in HOP_HEADERS]
            media = dict((k.lower(), v) for k, v in headers).get("content-type", "")
            if media.startswith("text/event-stream"):
                return StreamingResponse(
                    _rest(reply), status_code=start["status"], headers=dict(headers)
                )
            content = b"".join([piece async for piece in reply])
        except Exception as e:  # the replica died or is restarting: the client retries
            reply.cancel()
            return _error(
                503,
                f"replica {index} is unavailable ({type(e).__name__}: {str(e)[:300]}); retry",
                **{"Retry-After": "1", REPLICA_HEADER: str(index)},
            )
        response = Response(content, status_code=start["status"])
        for k, v in headers:  # repeated headers (set-cookie) kept
            response.headers.append(k, v)
        return response


def replica_cpus(cpus: float, replicas: int) -> float:
    """The CPUs each shard reserves, so that all of them fit `cpus` (the ingress: none)."""
    return max(0.01, math.floor(100 * cpus / replicas) / 100)


def build_app(
    *,
    store: str,
    replicas: int,
    engine_options: dict[str, Any],
    app_options: dict[str, Any],
    cpus: float,
    threads: int | None = None,
):
    """The Serve application: `replicas` shards and the ingress in front of them."""
    if replicas < 1:
        raise ValueError("replicas must be at least 1")
    shard = serve.deployment(Shard)
    shards = [
        shard.options(
            name=f"shard-{i}",
            num_replicas=1,
            ray_actor_options={"num_cpus": replica_cpus(cpus, replicas)},
            max_ongoing_requests=64,  # turns of different sessions run side by side
            graceful_shutdown_timeout_s=60,  # let a turn in progress finish
            max_constructor_retry_count=3,
        ).bind(i, store, engine_options, app_options, threads)
        for i in range(replicas)
    ]
    ingress = serve.deployment(Ingress).options(
        name="ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1024,
    )
    max_body = app_options.get("max_body_bytes", DEFAULT_MAX_BODY)
    return ingress.bind(shards, max_body)


def serve_ray(args, engine_options: dict[str, Any]) -> int:
    """`megacontext serve --ray`: start a local Ray instance, deploy, block until SIGTERM or
    SIGINT, then shut Serve and Ray down.

    Always a new single-node instance (never the cluster `RAY_ADDRESS` names): the store's
    SQLite runs in WAL mode, which needs every process that opens it on one host."""
    import os
    import signal
    import sys
    import threading

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    cpus = os.cpu_count() or 1
    ray.init(address="local", num_cpus=cpus, include_dashboard=False)
    try:  # until the app runs, SIGTERM exits through here (Ray's handler: sys.exit)
        serve.start(http_options={"host": args.host, "port": args.port})
        print(f"deploying {args.replicas} replicas of {args.model} ...", file=sys.stderr)
        app = build_app(
            store=os.path.abspath(args.store),
            replicas=args.replicas,
            engine_options=engine_options,
            app_options={"api_key": args.api_key, "default_max_tokens": args.max_tokens},
            cpus=cpus,
            threads=max(1, int(replica_cpus(cpus, args.replicas))),
        )
        serve.run(app, name=APP_NAME, route_prefix="/")
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        address = ray.get_runtime_context().gcs_address
        print(
            f"serving {args.replicas} replicas on http://{args.host}:{args.port} "
            f"(ray cluster {address}); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(1.0):
            pass
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal stops at once
            signal.signal(sig, signal.SIG_DFL)
        print("shutting down ...", file=sys.stderr, flush=True)
        serve.shutdown()
    finally:
        ray.shutdown()  # a local instance stops with it
    return 0
