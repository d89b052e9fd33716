"""Run the API server in a background thread of this process (notebooks, tests).

The socket is bound here, to port 0 of 127.0.0.1, so the OS picks a free port
and nobody can take it between choosing and listening.
"""
from __future__ import annotations

import socket
import threading
import time

import uvicorn


class BackgroundServer:
    """`with BackgroundServer(app) as server:` serves `app` at `server.url` until the block ends
    (or `server = BackgroundServer(app).start()` ... `server.stop()`)."""

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "warning", start_timeout_s: float = 60.0):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.start_timeout_s = start_timeout_s
        # uvicorn installs no signal handlers outside the main thread: stopping is should_exit.
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="minideploy-api-server", daemon=True)

    def start(self) -> "BackgroundServer":
        """Serve until `stop()` (a notebook keeps a server up across cells this way)."""
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the API server did not start within {self.start_timeout_s:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
