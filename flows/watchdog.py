"""A watchdog that ends what an mmdiag process started when that process is killed outright.

SIGKILL gives a process no chance to stop its children: Prefect's temporary API server (uvicorn)
and a local Dask cluster would run on as orphans. The watchdog is a separate small process that
notes the children of the process it watches (Linux: /proc) and, once that process is gone,
terminates them. `python -m flows.watchdog PID` runs it; `start()` spawns one for this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5


def start() -> subprocess.Popen | None:
    """Watch this process (where /proc exists); the watchdog ends by itself after it."""
    if not Path("/proc/self/stat").exists():
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "flows.watchdog", str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the terminal's group does not end it before its work
    )


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state; the name may hold spaces


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and _parent_of(int(entry.name)) == pid:
            found.append(int(entry.name))
    return found


def watch(pid: int) -> None:
    known: set[int] = set()
    while _alive(pid):
        known = {c for c in known if _alive(c)} | set(children(pid))
        time.sleep(POLL_S)
    left = [c for c in known if _alive(c)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for c in left:
            try:
                os.kill(c, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(c) for c in left):
            time.sleep(0.1)
        left = [c for c in left if _alive(c)]
        if not left:
            return


if __name__ == "__main__":
    watch(int(sys.argv[1]))
