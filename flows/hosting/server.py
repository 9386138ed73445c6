"""The temporary Prefect API server of a run without a server of the user's.

Prefect starts one itself when PREFECT_API_URL is unset, but only once the flow begins, and it
imports its whole server application into this process first (3 s here). Started here instead,
as the same uvicorn command, at the beginning of a run, it boots in its own process while this
one loads the data and the model; the flow is then pointed at it. It is this process's child:
stopped at exit, and by the watchdog if this process is killed. A fresh Prefect home gets its
database from the stored schema (`mmdiag.flows.hosting.prefect_db`): its first start then takes 5 s, not 15.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from mmdiag.flows.hosting import prefect_db
from mmdiag.pipeline.errors import MmdiagError

PORT_IN_USE = 3  # uvicorn's exit code when another process took the port first
PARENT_API_URL = "MMDIAG_PARENT_API_URL"  # set for the runs an mmdiag process starts side by side


class TemporaryServer:
    _running: TemporaryServer | None = None  # one per process, shared by its runs

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.port = 0

    @classmethod
    def get(cls) -> TemporaryServer | ParentServer:
        """This process's server, started on first use; in a run started side by side, its
        parent's."""
        if os.environ.get(PARENT_API_URL):
            return ParentServer(os.environ[PARENT_API_URL])
        if cls._running is None or cls._running.process is None or cls._running.process.poll() is not None:
            cls._running = cls()
            cls._running._launch()
            atexit.register(cls._running.stop)
        return cls._running

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _launch(self) -> None:
        with socket.socket() as s:  # a free port (uvicorn exits with PORT_IN_USE if it was taken since)
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        site = Path(importlib.util.find_spec("prefect").submodule_search_locations[0]).parent
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(site),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]
        # no block types registered: mmdiag uses no blocks, and a fresh Prefect home spent ~2 s
        # of its first start registering them
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1", "PREFECT_API_BLOCKS_REGISTER_ON_START": "false"}
        home = Path(os.environ.get("PREFECT_HOME", "."))
        if "PREFECT_HOME" in os.environ:
            prefect_db.seed(home)  # a fresh home's database from the stored schema, not 114 migrations
        # its output goes to a file: a pipe nobody reads would fill and stall the server
        self.log = home / "temporary-server.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 90.0, waiting=None, every: float = 3.0) -> str:
        """Block until the server answers its health check; its API URL. `waiting(seconds)` is
        called every `every` seconds of the wait (a first start creates Prefect's database)."""
        try:
            return _healthy(lambda: self.api_url, self._check, timeout, waiting, every)
        except TimeoutError:
            self.stop()
            raise MmdiagError(f"Prefect's temporary server did not start within {timeout:.0f} s; run `prefect server start` and set PREFECT_API_URL") from None

    def _check(self) -> None:
        """Relaunch on a port taken meanwhile; a server that exited otherwise is an error."""
        code = self.process.poll()
        if code == PORT_IN_USE:
            self._launch()
        elif code is not None:
            detail = self.log.read_text(errors="replace").strip().splitlines()
            raise MmdiagError(
                f"Prefect's temporary server exited with code {code} ({detail[-1] if detail else 'no output'}); check PREFECT_HOME, or run `prefect server start` and set PREFECT_API_URL"
            )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ParentServer:
    """The temporary server of the mmdiag process that started this one: awaited like our own,
    but not ours to start or stop."""

    def __init__(self, api_url: str):
        self.api_url = api_url

    def wait(self, timeout: float = 90.0, waiting=None, every: float = 3.0) -> str:
        try:
            return _healthy(lambda: self.api_url, lambda: None, timeout, waiting, every)
        except TimeoutError:
            raise MmdiagError(
                f"Prefect's temporary server at {self.api_url} (the parent mmdiag process's) did not answer within {timeout:.0f} s; run `prefect server start` and set PREFECT_API_URL"
            ) from None

    def stop(self) -> None:
        pass


def _healthy(url, check, timeout: float, waiting, every: float) -> str:
    """Poll url()'s health check until it answers (calling check() between tries); TimeoutError
    after `timeout` seconds."""
    import httpx

    start = time.monotonic()
    deadline, told = start + timeout, start
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if waiting is not None and time.monotonic() - told >= every:
                told = time.monotonic()
                waiting(told - start)
            check()
            try:
                if client.get(f"{url()}/health", timeout=2).status_code == 200:
                    return url()
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    raise TimeoutError


def stop_all() -> None:
    if TemporaryServer._running is not None:
        TemporaryServer._running.stop()
