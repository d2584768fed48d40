#!/usr/bin/env python3
"""Local DynamoDB emulator: moto's server app, one request at a time.

Stock ``moto_server`` handles every request on its own thread without any locking, so two
concurrent conditional updates of the same item can both see the old value and both succeed.
Real DynamoDB applies each single-item write atomically, and the gateway's exact rate limiting
and optimistic transactions depend on that.  Here every request runs under one process-wide
lock, held while moto handles it *and* while its response body is produced, which makes each
request atomic (and the emulator strictly serial: fine for tests, not a throughput benchmark).

Usage: dynamo_emulator.py [--host 127.0.0.1] [--port 0] [--verbose]

Once the socket accepts connections it prints exactly one line to stdout:
    dynamodb-emulator listening on http://HOST:PORT
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

try:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(
        f"dynamo_emulator: cannot import moto/werkzeug ({exc}); "
        "run infra/bootstrap.sh and use .venv/bin/python"
    )

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def serialized(app: WsgiApp) -> WsgiApp:
    """Wrap a WSGI app so that each request is handled under one global lock."""
    lock = threading.Lock()

    def wrapper(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        # Read the request body before taking the lock, so a slow client cannot stall others.
        length = environ.get("CONTENT_LENGTH")
        if length:
            try:
                size = int(length)
            except ValueError:
                size = -1
            if size >= 0:
                environ["wsgi.input"] = io.BytesIO(environ["wsgi.input"].read(size))
        with lock:
            result = app(environ, start_response)
            try:
                # Drain the body inside the lock: moto may compute it lazily.
                return list(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()

    return wrapper


class QuietHandler(MotoRequestHandler):
    """moto's request handler without one access-log line per request."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    app = serialized(DomainDispatcherApplication(create_backend_app))
    handler = MotoRequestHandler if args.verbose else QuietHandler
    try:
        server = make_server(args.host, args.port, app, threaded=True, request_handler=handler)
    except OSError as exc:
        print(f"dynamo_emulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    # moto builds some URLs from MOTO_PORT; keep it consistent with the real port.
    os.environ["MOTO_PORT"] = str(port)

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    # make_server has already bound and started listening: connections are accepted from now on.
    display_host = f"[{host}]" if ":" in str(host) else host
    print(f"dynamodb-emulator listening on http://{display_host}:{port}", flush=True)
    try:
        server.serve_forever()
    except SystemExit:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
