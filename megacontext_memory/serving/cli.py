"""`megacontext serve`: host one engine over HTTP (uvicorn), model loaded once; with
`--ray`, N engine replicas over one store on Ray Serve, each session pinned to one of them
(`ray_app.py`; ray is imported only then)."""

from __future__ import annotations

import argparse
import os
import sys


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megacontext serve",
        description="Serve the engine as an OpenAI-compatible API with per-session memory.",
    )
    p.add_argument("--store", default=os.environ.get("MEGACONTEXT_STORE", "megacontext-store"))
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--budget", type=int, default=1024, help="working-context budget (positions)")
    p.add_argument("--model", default="default", help="base model: 'default' or an HF id/path")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: automatic)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("MEGACONTEXT_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $MEGACONTEXT_API_KEY; none: open)",
    )
    p.add_argument("--max-tokens", type=int, default=256, help="reply limit when unspecified")
    add_engine_option(p)
    p.add_argument(
        "--ray",
        action="store_true",
        help="scale out on Ray Serve: a local Ray instance runs --replicas engines over "
        "the store, each session served by one of them",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="engine replicas with --ray (default 2); each loads the model once",
    )
    return p


def add_engine_option(p: argparse.ArgumentParser) -> None:
    """`--engine-option FIELD=VALUE`, read by `engine_overrides` (shared by the commands
    that build an engine)."""
    p.add_argument(
        "--engine-option",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other Config field, e.g. gist_refine_steps=0 (repeatable; VALUE as JSON)",
    )


def engine_overrides(options: list[str]) -> dict:
    """`FIELD=VALUE` pairs as Config overrides; VALUE is read as JSON, else kept as text."""
    import json

    out = {}
    for option in options:
        field, sep, value = option.partition("=")
        if not sep or not field:
            raise SystemExit(f"--engine-option {option!r}: expected FIELD=VALUE")
        try:
            out[field] = json.loads(value)
        except json.JSONDecodeError:
            out[field] = value
    return out


def serve_main(argv: list[str] | None = None) -> int:
    parser = serve_parser()
    args = parser.parse_args(argv)
    if args.ray:
        args.replicas = 2 if args.replicas is None else args.replicas
        if args.replicas < 1:
            parser.error("--replicas must be at least 1")
        try:
            from .ray_app import serve_ray
        except ImportError as e:
            parser.error(f"--ray needs Ray Serve: pip install 'megacontext-memory[serve]' ({e})")
        engine = {"working_budget": args.budget, "model": args.model, "device": args.device}
        return serve_ray(args, {**engine, **engine_overrides(args.engine_option)})
    if args.replicas is not None:
        parser.error("--replicas needs --ray")
    import uvicorn

    from ..engine import MegaContextEngine
    from .app import create_app

    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    engine = MegaContextEngine(
        store=args.store,
        working_budget=args.budget,
        model=args.model,
        device=args.device,
        **engine_overrides(args.engine_option),
    )
    app = create_app(
        engine, api_key=args.api_key, default_max_tokens=args.max_tokens, close_engine=True
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
