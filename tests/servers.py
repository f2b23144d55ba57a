"""Real ``mmgen serve`` processes for the tests: started on 127.0.0.1 with a free port, stopped after."""
from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import mmgen_engine as mm

READY = re.compile(r"mmgen serve: listening on (http://\S+)")


def demo_models(*tasks: str) -> list[str]:
    """``--model`` arguments serving the bundled demo models of ``tasks`` (all three by default)."""
    args = []
    for task in tasks or ("captioning", "text-to-image", "speech-to-gesture"):
        args += ["--model", str(mm.demo_model(task))]
    return args


class Server:
    """A running ``mmgen serve`` subprocess: ``url``, ``proc`` and the output it printed (``log()``)."""

    def __init__(self, args: list[str], ready_timeout: float, env: dict | None = None):
        cmd = [sys.executable, "-m", "mmgen_engine.cli", "serve", "--port", "0", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._ready: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.url = self._ready.get(timeout=ready_timeout)
        except queue.Empty:
            self.stop()
            raise RuntimeError(f"the server was not ready within {ready_timeout} s:\n{self.log()}") from None
        if self.url is None:
            raise RuntimeError(f"the server exited with status {self.proc.wait()}:\n{self.log()}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            match = READY.search(line)
            if match:
                self._ready.put(match.group(1))
        self._ready.put(None)

    def log(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then the exit status (killed after ``timeout`` seconds)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def stop(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.terminate(30)

    def rss(self) -> int:
        """The server process's resident memory in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def running_server(*args: str, ready_timeout: float = 120, env: dict | None = None):
    """``with running_server(*demo_models("captioning"), "--slots", "4") as server: server.url``"""
    server = Server(list(args), ready_timeout, env)
    try:
        yield server
    finally:
        server.stop()


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "the condition"):
    """Poll ``predicate()`` until it returns a true value (returned), at most ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(interval)
