"""An ASGI app (Starlette) served by uvicorn on a socket bound before serving starts: in this
thread until interrupted (the commands), or in a background thread (tests, benchmarks).

Binding first means port 0 takes a free port whose URL is known before the first request, and
a port already taken is a one-line ``DDRLError`` instead of a uvicorn traceback. uvicorn's own
logging configuration is left alone (``log_config=None``: warnings reach stderr) and it sends no
``server`` header of its own (a caller may name one).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Awaitable, Callable

import uvicorn

from ddrl.errors import DDRLError, first_line


def bind(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (IPv6 when ``host`` has a colon; port 0 =
    a free one); connections that come before uvicorn accepts wait instead of failing."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise DDRLError(f"cannot listen on {host}:{port}: {first_line(e)}") from None
    return sock


class Served:
    """``app`` on the bound socket ``sock`` (``url`` says where), not yet serving: ``start()``
    serves in a daemon thread, ``serve_forever()`` in this one; ``shutdown()`` stops it and
    frees the port (also when it never served). ``header``: the ``server`` header it sends;
    ``graceful``: seconds a request in progress may hold shutdown."""

    def __init__(
        self,
        app: Callable[..., Awaitable[None]],
        sock: socket.socket,
        header: str = "",
        graceful: int = 10,
    ):
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        config = uvicorn.Config(
            app,
            lifespan="on",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            headers=[("server", header)] if header else [],
            timeout_graceful_shutdown=graceful,
        )
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def serve_forever(self, ready: Callable[[str], None] | None = None) -> None:
        """Serve until ``shutdown()`` or a signal; ``ready(url)`` once it answers requests (its
        lifespan has started and it listens)."""
        if ready is not None:
            threading.Thread(target=self._announce, args=(ready,), daemon=True).start()
        self._uvicorn.run(sockets=[self._sock])

    def _announce(self, ready: Callable[[str], None]) -> None:
        while not self._uvicorn.started and not self._uvicorn.should_exit:
            time.sleep(0.02)
        if self._uvicorn.started:
            ready(self.url)

    def start(self, timeout: float = 30.0) -> Served:
        """Serve in a daemon thread; returns once it answers requests."""
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise DDRLError(f"server {self.url} did not start")
            time.sleep(0.02)
        return self

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        self._sock.close()

    def __enter__(self) -> Served:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()
