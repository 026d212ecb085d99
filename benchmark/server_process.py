"""A sglang-duet server as a child process of the A/B harness.

The server runs in its own session (process group) so that stopping it reaches its scheduler
and detokenizer children too: SIGTERM first (the server drains and stops them), SIGKILL to
the group if anything is left after a grace period. Output goes to a log file whose tail is
what we report when the server fails to start or dies.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque


class ServerStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except OSError:
        return ""


class ServerProcess:
    def __init__(self, flags: list[str], log_path: str, host: str = "127.0.0.1", port: int | None = None,
                 python: str = sys.executable, env: dict | None = None):
        self.host, self.port = host, port or free_port()
        self.cmd = [python, "-m", "sglang_duet.launch_server", "--host", host, "--port", str(self.port), *flags]
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 600.0) -> "ServerProcess":
        """Launch and wait for /health == 200; on a crash or timeout, raise with the log tail."""
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"\n$ {' '.join(self.cmd)}\n")
            log.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise ServerStartError(f"server exited with code {code} during startup; log tail:\n"
                                       f"{log_tail(self.log_path)}")
            if self._healthy():
                return self
            time.sleep(0.5)
        tail = log_tail(self.log_path)
        self.stop()
        raise ServerStartError(f"server not healthy after {timeout_s:.0f} s; log tail:\n{tail}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=2.0) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of the group we started (a stuck child, or the server itself).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
