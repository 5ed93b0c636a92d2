"""Peak server memory for requests of N well-compressed huge grids: the service before and after bounding it.

One request of N multipart parts, each a 4096x4096 all-white PNG (about 57 kB,
within the default per-grid pixel limit), is sent to a fresh ``mrc serve``
process per measurement. The server's own peak resident memory (``VmHWM`` in
``/proc/<pid>/status``) is reset to the current resident memory after a
warm-up request (16 object grids: imports, thread pools and the scoring
batch's allocations are made once) and read again after the big request; the
difference is the memory the request cost above the idle server. Also reported: the answer,
its time, and the memory still held afterwards (``VmRSS``).

``--baseline-rev REV`` runs the same measurements against the service as it
was at git revision ``REV`` (checked out in a temporary worktree and put first
on ``PYTHONPATH``), in the same run, so the before/after ratio is side by side.
A server whose resident memory passes ``--rss-cap-gib`` is killed and reported
as such (the unbounded baseline can need more than the machine has).

    .venv/bin/python bench/bench_service_memory.py --baseline-rev 3c9a636 --out out/bench-memory
    .venv/bin/python bench/bench_service_memory.py --parts 1,8          # the current service only
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from PIL import Image

from carve3d_reward.pixels import to_uint8
from carve3d_reward.service.launch import free_port, stop, wait_ready
from carve3d_reward.tools.synthetic import make_grids

REPO = Path(__file__).resolve().parents[1]
SIDE = 4096


@dataclass
class Measurement:
    server: str  # "baseline" | "current" | "current, limit raised"
    parts: int
    status: int | str  # HTTP status, or why there is none
    seconds: float
    peak_growth_mib: float  # VmHWM after - VmHWM before
    held_after_mib: float  # VmRSS after - VmRSS before
    detail: str = ""


def white_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), "white").save(buf, format="PNG")
    return buf.getvalue()


def warm_up_parts(n: int = 16) -> list[tuple[str, tuple[str, bytes, str]]]:
    """``max_batch`` (16) object grids at the working resolution: the scoring batch's memory, reached first."""
    grids = make_grids(n, seed=3, view_size=128).permute(0, 2, 3, 1).numpy()
    out = []
    for i, grid in enumerate(grids):
        buf = io.BytesIO()
        Image.fromarray(to_uint8(grid)).save(buf, format="PNG")
        out.append(("grid", (f"warm{i}.png", buf.getvalue(), "image/png")))
    return out


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """Set the process's peak resident memory to its current one (Linux: ``echo 5 > /proc/<pid>/clear_refs``)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@contextlib.contextmanager
def server(
    pythonpath: str | None, extra_env: dict[str, str], cap_kib: int
) -> Iterator[tuple[str, subprocess.Popen, dict]]:
    port = free_port()
    env = {**os.environ, **extra_env}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    exe = Path(sys.executable).with_name("mrc")
    proc = subprocess.Popen(
        [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed = {"over_cap": False}
    done = threading.Event()

    def watch() -> None:  # the unbounded baseline may take more memory than the machine has
        while not done.wait(0.05):
            with contextlib.suppress(OSError, KeyError):
                if status_kib(proc.pid, "VmRSS") > cap_kib:
                    killed["over_cap"] = True
                    proc.kill()
                    return

    threading.Thread(target=watch, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, 180.0)
        yield url, proc, killed
    finally:
        done.set()
        stop(proc, timeout=30)


def measure(label: str, pythonpath: str | None, parts: int, env: dict[str, str], cap_kib: int) -> Measurement:
    big = white_png()
    files = [("grid", (f"{i}.png", big, "image/png")) for i in range(parts)]
    with server(pythonpath, env, cap_kib) as (url, proc, killed):
        warm = httpx.post(url + "/mrc", files=warm_up_parts(), timeout=300)
        assert warm.status_code == 200, warm.text
        reset_peak(proc.pid)
        hwm0, rss0 = status_kib(proc.pid, "VmHWM"), status_kib(proc.pid, "VmRSS")
        start = time.perf_counter()
        try:
            r = httpx.post(url + "/mrc", files=files, timeout=900)
            status: int | str = r.status_code
            detail = r.json().get("detail", "") if r.status_code != 200 else ""
        except httpx.HTTPError as exc:
            status, detail = "no answer", f"{type(exc).__name__}"
        seconds = time.perf_counter() - start
        if killed["over_cap"]:
            return Measurement(
                label,
                parts,
                f"killed over {cap_kib / 2**20:.0f} GiB",
                seconds,
                cap_kib / 1024 - hwm0 / 1024,
                float("nan"),
                detail,
            )
        time.sleep(2.0)  # the service hands freed memory back after 1 s idle
        hwm1, rss1 = status_kib(proc.pid, "VmHWM"), status_kib(proc.pid, "VmRSS")
    return Measurement(label, parts, status, seconds, (hwm1 - hwm0) / 1024, (rss1 - rss0) / 1024, detail)


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mrc-baseline-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True, capture_output=True
        )
        try:
            yield path
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False, capture_output=True
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="1,8,64", help="comma-separated numbers of 4096x4096 parts per request")
    ap.add_argument("--baseline-rev", default=None, help="git revision of the service to compare with")
    ap.add_argument("--rss-cap-gib", type=float, default=16.0, help="kill a server whose resident memory passes this")
    ap.add_argument("--out", type=Path, default=None, help="folder for memory.json")
    args = ap.parse_args(argv)
    parts = [int(x) for x in args.parts.split(",")]
    cap_kib = int(args.rss_cap_gib * 2**20)
    raised = {"MRC_MAX_REQUEST_PIXELS": str(max(parts) * SIDE * SIDE)}
    rows: list[Measurement] = []
    with contextlib.ExitStack() as stack:
        baseline = None
        if args.baseline_rev:
            baseline = str(stack.enter_context(worktree(args.baseline_rev)) / "services" / "reward")
        for n in parts:
            if baseline is not None:
                rows.append(measure(f"baseline {args.baseline_rev}", baseline, n, {}, cap_kib))
                print(rows[-1], flush=True)
            rows.append(measure("current", None, n, {}, cap_kib))
            print(rows[-1], flush=True)
            if n * SIDE * SIDE > 256 * 1024 * 1024:  # over the default request budget: also with the limit raised
                rows.append(measure("current, max_request_pixels raised", None, n, raised, cap_kib))
                print(rows[-1], flush=True)
    print("\n| server | parts | answer | s | peak growth MiB | held after MiB |")
    print("|---|---:|---|---:|---:|---:|")
    for m in rows:
        cells = (m.server, m.parts, m.status, f"{m.seconds:.1f}", f"{m.peak_growth_mib:.0f}", f"{m.held_after_mib:.0f}")
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if baseline is not None:
        for n in parts:
            before = next(m for m in rows if m.parts == n and m.server.startswith("baseline"))
            after = [m for m in rows if m.parts == n and m.server.startswith("current") and m.status == 200]
            if after:
                ratio = before.peak_growth_mib / max(after[-1].peak_growth_mib, 1.0)
                print(f"parts {n}: peak growth before / after = {ratio:.1f}x")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "memory.json").write_text(json.dumps([asdict(m) for m in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
