"""`moescope dashboard` on a port that is already taken: one line naming a free port."""

from __future__ import annotations

import os
import socket

from moescope.analysis.run.cli import main


def test_a_busy_port_is_refused_with_the_next_free_one(monkeypatch, capsys):
    launched = []
    monkeypatch.setattr(os, "execv", lambda exe, cmd: launched.append(cmd))
    monkeypatch.setattr(os, "chdir", lambda path: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = main(["dashboard", "demo", "--address", "127.0.0.1", "--port", str(port)])
        err = capsys.readouterr().err
    assert rc == 2 and not launched
    assert f"port {port} on 127.0.0.1 is in use" in err and "moescope dashboard --port " in err
    suggested = int(err.split("--port ")[1].split("`")[0])
    assert suggested > port
    assert len(err.strip().splitlines()) == 1
