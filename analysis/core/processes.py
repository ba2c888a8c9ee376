"""Whether a process is still running (jobs, cache locks and atomic writes ask it)."""

from __future__ import annotations

import os


def process_alive(pid: int | None) -> bool:
    """Whether process ``pid`` is running (a zombie, finished but not yet reaped, is not)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (finished, not yet reaped by the parent that started it) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True

