"""`python app.py` in a subprocess on a free port, for the app benchmark and the HTTP / browser tests.

    server = AppServer("embedded", "app.log", dtype="auto", head=None, threads=None)
    url = server.wait_ready()      # once the page answers HTTP (the app warms up first)
    ...                            # drive it with gradio_client or a browser
    server.stop()
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]  # where app.py lives in a checkout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppServer:
    """`python app.py` on a free port (its log in a file); `url` once it answers HTTP. root: the folder app.py runs
    from (the repository by default); threads: OMP_NUM_THREADS (None: the machine's default); env_extra: more
    environment, None values unset."""

    def __init__(self, model: str, log_path, dtype: str = "float32", head: str | None = "random",
                 threads: int | None = 1, root=None, env_extra: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = dict(os.environ, NANOSPEC_MODEL=model, NANOSPEC_DTYPE=dtype, GRADIO_SERVER_NAME="127.0.0.1",
                   GRADIO_SERVER_PORT=str(self.port), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
                   PYTHONUNBUFFERED="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        if head:
            env["NANOSPEC_HEAD"] = head
        env.update(env_extra or {})
        env = {key: value for key, value in env.items() if value is not None}
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "app.py"], cwd=Path(root or REPOSITORY), env=env,
                                        stdout=self._log, stderr=subprocess.STDOUT)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout_s: float = 180.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return self.url
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"app.py not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:  # it would not stop: kill it (ours, by pid)
            self.process.kill()
            self.process.wait()
        self._log.close()
