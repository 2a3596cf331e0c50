"""``python -m snapstore.server``: the REST server of a running store (``snapstore up`` starts it).

Steps, in order:

1. Decide the token (:func:`snapstore.server.auth.decide_token`: ``--token`` over
   ``$SNAPSTORE_REST_TOKEN``; generated when bound beyond loopback without one)
   and the Host names answered (:func:`snapstore.server.auth.allowed_hosts`).
2. Bind the listening socket (``--port 0``: a free port), so a taken port
   fails at once with a clear message.
3. Find the store through its state file in ``--runtime-dir``, connect to its
   Ray cluster (on this main thread), start the snapshot poller and wait up
   to ``--first-snapshot-timeout`` s for its first snapshot (the server
   serves without one too: ``/healthz`` then says 503).
4. Serve with uvicorn; once it accepts connections write ``--ready-file``
   atomically (temporary file, then rename): ``url``, ``host``, ``port``,
   ``token`` and ``token_generated``. ``snapstore up`` waits for that file.
5. On SIGTERM/SIGINT stop serving and polling, and remove the ready file.

Exit codes: 0 after a signal, 2 when the store cannot be found or the
address cannot be bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from snapstore.server.auth import TOKEN_ENV, TokenDecision, allowed_hosts, decide_token

logger = logging.getLogger("server")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m snapstore.server", description=__doc__.splitlines()[0]
    )
    p.add_argument("--runtime-dir", default=None, help="where the store's state file lives")
    p.add_argument("--host", default="127.0.0.1", help="address to bind [127.0.0.1]")
    p.add_argument("--port", type=int, default=8470, help="port to bind; 0 picks a free one [8470]")
    p.add_argument(
        "--token",
        default=None,
        help=f"bearer token to require (prefer ${TOKEN_ENV}: the command line is visible in ps)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests with this Host header (repeat; '*': any) [only the bound "
        "address, and 127.0.0.1/localhost/::1 when that is loopback]",
    )
    p.add_argument("--ready-file", default=None, help="JSON file written once serving")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between snapshots")
    p.add_argument(
        "--stale-after", type=float, default=5.0, help="snapshot age at which /healthz fails"
    )
    p.add_argument("--first-snapshot-timeout", type=float, default=15.0)
    return p


def bind(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket for ``host``:``port``."""
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG
    )
    last: OSError | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        except OSError as e:
            sock.close()
            last = e
            continue
        sock.set_inheritable(False)
        return sock
    raise OSError(f"cannot bind {host}:{port}: {last}")


def url_of(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write_ready(path: str, info: dict[str, Any]) -> None:
    """Write ``info`` to ``path`` atomically, readable only by this user (it holds the token):
    an exclusive, no-follow 0600 file renamed into place."""
    from snapstore.private import write_private

    write_private(path, json.dumps(info).encode())


async def _serve(
    server: Any, sock: socket.socket, ready_file: str | None, info: dict[str, Any]
) -> int:
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            logger.error("uvicorn stopped before serving")
            return 2
        await asyncio.sleep(0.02)
    if ready_file:
        write_ready(ready_file, info)
    logger.info("serving on %s", info["url"])
    await task
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = _parser().parse_args(argv)
    decision: TokenDecision = decide_token(args.host, args.token or os.environ.get(TOKEN_ENV))
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        print(f"server: {e} (choose another --port, or 0 for a free one)", file=sys.stderr)
        return 2
    host, port = args.host, sock.getsockname()[1]

    import uvicorn

    from snapstore.control.handle import connect
    from snapstore.errors import SnapstoreError
    from snapstore.server.app import create_app
    from snapstore.server.poller import CoordinatorSource, Poller

    try:
        store = connect(args.runtime_dir)
        store.connect_ray()
    except SnapstoreError as e:
        print(f"server: {e}", file=sys.stderr)
        return 2
    poller = Poller(
        CoordinatorSource(store), interval=args.poll_interval, stale_after=args.stale_after
    )
    poller.start()
    if not poller.wait_first(args.first_snapshot_timeout):
        logger.warning(
            "no snapshot from the coordinator within %s s (%s); serving anyway",
            args.first_snapshot_timeout,
            poller.state().last_error,
        )
    app = create_app(poller, decision.token, allowed_hosts(args.host, args.allow_host))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    info = {
        "url": url_of(host, port),
        "host": host,
        "port": port,
        "token": decision.token,
        "token_generated": decision.generated,
        "pid": os.getpid(),
    }
    try:
        return asyncio.run(_serve(server, sock, args.ready_file, info))
    finally:
        poller.stop()
        if args.ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.ready_file)


if __name__ == "__main__":
    sys.exit(main())
