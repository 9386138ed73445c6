"""A watchdog that ends what an mmdiag process started when that process is killed outright.

SIGKILL gives a process no chance to stop its children: Prefect's temporary API server (uvicorn)
and a local Dask cluster would run on as orphans. The watchdog is a separate small process that
notes the children of the process it watches (Linux: /proc) and, once that process is gone,
terminates them. `python -m mmdiag.flows.hosting.watchdog PID` runs it; `start()` spawns one for this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5


_mine: list = []  # the watchdog of this process, once started


def watch_this_process() -> None:
    """Once per process, before it starts any child it must not leave behind (the temporary
    Prefect server, a local Dask cluster): a watchdog that ends them if this process is killed
    with SIGKILL, which leaves it no time to do so."""
    if not _mine:
        _mine.append(start())


def start() -> subprocess.Popen | None:
    """Watch this process (where /proc exists); the watchdog ends by itself after it."""
    if not Path("/proc/self/stat").exists():
        return None
    already = [str(c) for c in children(os.getpid())]  # not ours to end: they were there before mmdiag ran
    return subprocess.Popen(
        [sys.executable, "-m", "mmdiag.flows.hosting.watchdog", str(os.getpid()), *already],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the terminal's group does not end it before its work
    )


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the name (which may hold spaces): state, ppid, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _parent_of(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def _started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, who it is."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and _parent_of(int(entry.name)) == pid:
            found.append(int(entry.name))
    return found


def watch(pid: int, exclude: set[int] = frozenset()) -> None:
    """Wait for `pid` to end, then terminate (SIGTERM, then SIGKILL) the children it had started,
    each still the same process (pid and start time)."""
    born = _started(pid)
    known: dict[int, str] = {}
    while _alive(pid) and _started(pid) == born:
        known = {c: t for c, t in known.items() if _started(c) == t}
        known.update({c: _started(c) for c in children(pid) if c not in exclude and c not in known})
        time.sleep(POLL_S)
    left = [c for c, t in known.items() if t is not None and _alive(c) and _started(c) == t]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for c in left:
            try:
                os.kill(c, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(c) for c in left):
            time.sleep(0.1)
        left = [c for c in left if _alive(c) and _started(c) == known[c]]
        if not left:
            return


if __name__ == "__main__":
    watch(int(sys.argv[1]), {int(a) for a in sys.argv[2:]})
