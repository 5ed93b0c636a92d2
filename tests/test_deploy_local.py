"""`make up` / `make down` without Docker: the local reward server and trainer as process groups."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from .deploy.common import BIN, ROOT, png_bytes
from .serving import free_port

pytestmark = pytest.mark.slow  # `make up` starts the reward server and a trainer as child processes


def _pgid_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _cmdlines_with(needle: str) -> list[str]:
    found = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd and str(os.getpid()) != path.parent.name:
            found.append(f"{path.parent.name}: {cmd}")
    return found


@pytest.mark.skipif(not Path("/proc").is_dir() or shutil.which("make") is None, reason="needs Linux /proc and make")
@pytest.mark.timeout(420)
def test_make_up_score_make_down_leaves_nothing_behind(tmp_path) -> None:
    port = free_port()
    out_dir = tmp_path / "out"
    started = tmp_path / "trainer-started"
    trainer = tmp_path / "carve3d-train"
    # A stand-in trainer with a child process: `make down` must stop the whole process group.
    trainer.write_text(f'#!/usr/bin/env bash\necho "$MRC_URL $*" > {started}\nsleep 300 &\nwait\n')
    trainer.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRC_")}
    env |= {
        "MRC_PORT": str(port),
        "MRC_VIEW_SIZE": "64",
        "MRC_CARVE_RESOLUTION": "32",
        "MRC_CARVE_SAMPLES": "64",
        "TRAINER": "on",
        "TRAINER_BIN": str(trainer),
        "TRAINER_ARGS": "--steps 1",
        "READY_TIMEOUT": "180",
        "STOP_TIMEOUT": "20",
    }
    # -o: never (re)build the venv from inside the test; VENV_BIN: the interpreter running the tests
    make = ["make", "-s", "-o", ".venv/.installed", f"OUT={out_dir}", f"BIN={BIN}"]
    pids: list[int] = []
    try:
        up = subprocess.run([*make, "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert f"curl --data-binary @{out_dir}/local/grid.png -H 'content-type: image/png'" in up.stdout
        assert f"http://127.0.0.1:{port}/mrc" in up.stdout and "scrape check: /metrics parses" in up.stdout
        pids = [int((out_dir / "local" / f"{n}.pid").read_text().split()[0]) for n in ("reward", "trainer")]
        # score a grid through it: the example grid `make up` printed, and one of ours
        url = f"http://127.0.0.1:{port}/mrc"
        for body in ((out_dir / "local" / "grid.png").read_bytes(), png_bytes()):
            r = httpx.post(url, content=body, headers={"content-type": "image/png"}, timeout=120)
            assert r.status_code == 200 and r.json()["status"] == "ok", r.text
        deadline = time.monotonic() + 10
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started.read_text().split() == [f"http://127.0.0.1:{port}", "--steps", "1"]
        assert len(_pgid_members(pids[1])) >= 2, "the stand-in trainer and its child"
        down = subprocess.run([*make, "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "reward: stopped" in down.stdout and "trainer: stopped" in down.stdout
        for pid in pids:
            assert _pgid_members(pid) == [], f"process group {pid} still has processes"
        assert _cmdlines_with(f"--port {port}") == []
        assert not list((out_dir / "local").glob("*.pid"))
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "something still listens on the port"
        again = subprocess.run([*make, "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0
    finally:  # never leave a server behind, even when an assertion failed
        subprocess.run([*make, "down"], cwd=ROOT, env=env, capture_output=True, timeout=120)
        for pid in pids:
            for member in _pgid_members(pid):
                os.kill(member, signal.SIGKILL)
