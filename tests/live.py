"""A drllm server in a thread on a free loopback port, for tests that talk real HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn


class LiveServer:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app: object) -> None:
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, wait_ready: bool = True) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.server.started:
                if not wait_ready or httpx.get(self.url + "/health").status_code == 200:
                    return self
            time.sleep(0.05)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def run_server(app: object, wait_ready: bool = True) -> Iterator[LiveServer]:
    srv = LiveServer(app).start(wait_ready)
    yield srv
    srv.stop()
