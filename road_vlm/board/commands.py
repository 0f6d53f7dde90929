"""``road-vlm board --runs DIR [DIR ...]``: serve the board on loopback, or write it to a file with ``--output``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# The page has no script and loads nothing: inline styles and SVG only.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def board_html(roots: list[Path]) -> str:
    from road_vlm.board.page import render
    from road_vlm.board.runs import scan

    return render(scan(roots), [str(r) for r in roots])


def create_board_app(roots: list[Path], *, allowed_hosts: tuple[str, ...] | None = None) -> Any:
    """A FastAPI app answering ``GET /`` with the board, re-read on every request."""
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import HTMLResponse

    from road_vlm.serve.http_guards import LOOPBACK_HOSTS, HostCheck, host_name

    app = FastAPI(title="road_vlm board", docs_url=None, redoc_url=None, openapi_url=None)
    hosts = LOOPBACK_HOSTS if allowed_hosts is None else allowed_hosts
    app.add_middleware(HostCheck, allowed={host_name(h) for h in hosts})

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(await run_in_threadpool(board_html, roots), headers=SECURITY_HEADERS)

    return app


def _command(args: argparse.Namespace) -> int:
    roots = [Path(r).expanduser() for r in args.runs]
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        print(f"road-vlm board: not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(board_html(roots), encoding="utf-8")
        print(f"road-vlm board: wrote {args.output}", file=sys.stderr)
        return 0
    import uvicorn

    from road_vlm.serve.http_guards import LOOPBACK_HOSTS

    app = create_board_app(roots, allowed_hosts=(*LOOPBACK_HOSTS, args.host))
    print(f"road-vlm board: {', '.join(map(str, roots))} at http://{args.host}:{args.port}/", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def register(subparsers: Any) -> None:
    """Add ``board`` to the ``road-vlm`` command."""
    parser = subparsers.add_parser(
        "board", help="training runs (loss, learning rate, parameters, time, memory) and eval tables, read-only",
        description=__doc__)
    parser.add_argument("--runs", nargs="+", default=["outputs"],
                        help="folders to search for runs (summary.json) and eval results (results.json)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback only)")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--output", help="write the page to this HTML file instead of serving it")
    parser.set_defaults(func=_command)
