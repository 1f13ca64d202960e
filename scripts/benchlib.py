"""What the benchmark scripts share: free ports and a throwaway redis-server.

The scripts run as `python scripts/<name>.py`, which puts this directory on
`sys.path`, so they import it as `benchlib`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def throwaway_redis(
    start_timeout: float = 10.0, cpu: int | None = None
) -> Iterator[tuple[str, str]]:
    """A redis-server without persistence on a free loopback port (pinned to
    `cpu` with taskset when given and available).

    Yields (url, its working directory); the server is terminated and the
    directory removed on exit. Raises OSError when it does not accept a
    connection within `start_timeout` seconds.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        pin = ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []
        server = subprocess.Popen(
            [*pin, shutil.which("redis-server") or "redis-server", "--port", str(port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0", directory
        finally:
            server.terminate()
            server.wait()
