"""Whether a process is still running (jobs, cache locks and atomic writes ask it), and how much
memory this process may still take (checks of a requested computation's size ask it)."""

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



def launched_by_torchrun() -> bool:
    """Whether torchrun (or a launcher setting the same variables) started this process with
    more than one rank (read from the environment, so the CLI asks without importing torch)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


MEMORY_ENV = "MOESCOPE_MEMORY_BYTES"  # overrides what available_memory() reads (tests; a stated budget)


def available_memory() -> int | None:
    """Bytes of memory this process may still take: ``MOESCOPE_MEMORY_BYTES`` when set, else the
    smaller of the kernel's ``MemAvailable`` and what the cgroup's limit leaves (``memory.max`` −
    ``memory.current``, cgroup v2), None where neither can be read."""
    given = os.environ.get(MEMORY_ENV)
    if given:
        return int(given)
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                found.append(max(0, int(limit) - int(f.read().strip())))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM (the CLI installs the handler), so
    that cleanup runs as for Ctrl-C: child processes stopped, temporary files removed."""


def _die_with_parent() -> None:
    """In a child, before exec: ask Linux to SIGKILL it when its parent dies (even by SIGKILL)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_child(cmd: list[str], env: dict | None = None):
    """``subprocess.run(cmd, capture_output=True, text=True)`` whose child never outlives this
    process: Ctrl-C, SIGTERM (:class:`Terminated`) or any exception here kills it before
    re-raising, and on Linux it is killed by the kernel if this process dies."""
    import subprocess
    import sys

    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=preexec)
    try:
        out, err = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
