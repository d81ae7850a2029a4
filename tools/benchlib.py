"""What the side-by-side benchmark scripts share: running a contender in a fresh interpreter, reading its memory,
warming the page cache, and the one line that says which machine and versions a figure came from."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT_MARK = "BENCH_RESULT "  # a child prints its figures as one JSON line after this mark


def status_gib(key: str, pid: int | str = "self") -> float:
    """A memory line of /proc/PID/status: VmRSS (all resident pages), VmHWM (their peak) or RssAnon (those not
    backed by a file)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20  # kB
    raise KeyError(key)


def spawn(cmd: list[str], extra_env: dict[str, str] | None = None) -> dict:
    """Run one contender's child process; its RESULT_MARK line plus the wall time of the whole process, or
    {"error": ...} with the last line it printed to stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           **(extra_env or {})}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
    process_s = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return {**json.loads(lines[-1][len(RESULT_MARK):]), "process_s": process_s}


def warm_page_cache(model_dir: Path, what: str = "checkpoint") -> str:
    """Read the files once if they fit comfortably in RAM, so no contender pays for the first disk read."""
    files = [p for p in model_dir.iterdir() if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    available = _meminfo_bytes("MemAvailable")
    if size > available / 2:
        return (f"cold: the {size / 2**30:.1f} GiB {what} is over half of the {available / 2**30:.1f} GiB "
                "available, so every run reads (most of) it from disk")
    for path in files:
        with open(path, "rb") as f:
            while f.read(64 * 2**20):
                pass
    return f"warm: {size / 2**30:.2f} GiB {what} read once before timing"


def _meminfo_bytes(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def versions(dists: tuple[str, ...]) -> list[str]:
    out = []
    for dist in dists:
        try:
            out.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist} (not installed)")
    return out


def repo_revision() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "(not a git checkout)"


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())


def ram_gib() -> float:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


def environment_line(dists: tuple[str, ...]) -> str:
    """CPU, cores, RAM, load average now (other work skews timings), Python and package versions, our revision."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"CPU: {cpu_name()}, {os.cpu_count()} cores, {ram_gib():.0f} GiB RAM, load average {load} at the end; "
            f"Python {platform.python_version()}; " + ", ".join(versions(dists)) + f", qlora-kit {repo_revision()}")
