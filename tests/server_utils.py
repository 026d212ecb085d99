"""Start the real server in a subprocess on a free port, wait for /health, stop it at the end."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "configs", "models", "tiny-overhead.json")
# Several servers on one machine: each would pin its model threads to the CPUs it plans as if it were
# alone (--cpu-bind auto, server/cpu_threads.py), all to the same ones; tests that run several at once
# leave them to the kernel, as a user running several on one host would (README).
SHARED_HOST = ["--cpu-bind", "off"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m sglang_duet.launch_server ARGS --port <free>`; output goes to a log file (a pipe
    nobody reads would fill up and block the server)."""

    def __init__(self, args: list[str], startup_timeout: float = 240.0, api_key: str | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self._final_log: str | None = None
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sglang-duet-server-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "sglang_duet.launch_server", "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        # One torch thread unless told otherwise: on a small shared CPU, OpenMP threads spin-waiting
        # for a busy core make each matmul many times slower (measured: 6x on 2 cores under load).
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        try:
            self._wait_healthy(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        if self._final_log is not None:
            return self._final_log[-n:]
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-n:]

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def url(self, path: str) -> str:
        return self.base_url + path

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._final_log is None:  # keep the text for failure messages, drop the file
            self._final_log = self.log_tail(1 << 20)
            self.log.close()
            os.unlink(self.log.name)
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
