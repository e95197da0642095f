"""What every benchmark script shares: the machine it ran on, how busy that machine was, the
command that produced a figure, and writing one section of BENCHMARKS.md without touching the
sections other scripts own."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INTRO = """# Benchmarks

Benchmarks are run on demand (the command is given in each section), not in CI: their figures
depend on the machine and on what else it is doing. Each section therefore compares against
baselines measured **in the same run** on the same machine, and the ratios are what carry over
to another machine, not the absolute milliseconds.
"""


def run_cmd(*cmd: str) -> str:
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=10)
        return res.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def git_commit() -> str:
    commit = run_cmd("git", "rev-parse", "--short", "HEAD") or "?"
    if run_cmd("git", "status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return commit


def machine_info() -> dict[str, str]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": run_cmd("nproc") or str(os.cpu_count()),
        "cpu": cpu or platform.machine(),
        "python": platform.python_version(),
        "llama": version("llama_cpp_python"),
        "torch": version("torch"),
        "diffusers": version("diffusers"),
        "libp2p": version("libp2p"),
        "commit": git_commit(),
    }


def cpu_times() -> tuple[int, int] | None:
    """(total, idle + iowait) jiffies of all CPUs, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(fields), fields[3] + fields[4]


def other_cpu_share(start: tuple[tuple[int, int] | None, os.times_result], wall_s: float) -> str:
    """CPU time used by processes other than this benchmark (and its reaped children) while it
    ran, as a share of the machine; ``start`` is ``(cpu_times(), os.times())`` at the start."""
    t1, own1 = start
    t2, own2 = cpu_times(), os.times()
    if t1 is None or t2 is None or wall_s <= 0:
        return "unknown"
    busy_s = ((t2[0] - t2[1]) - (t1[0] - t1[1])) / os.sysconf("SC_CLK_TCK")
    own_s = sum(own2[:4]) - sum(own1[:4])
    return f"{max(0.0, 100.0 * (busy_s - own_s) / (wall_s * (os.cpu_count() or 1))):.0f}%"


def command_line() -> str:
    argv = list(getattr(sys, "orig_argv", []) or [sys.executable, *sys.argv])
    argv[0] = Path(argv[0]).name  # "python", not the interpreter's full path
    return shlex.join(argv)


def _heading_lines(lines: list[str]) -> list[int]:
    """Indexes of ``## `` heading lines, outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.startswith("## "):
            out.append(i)
    return out


def replace_section(text: str, heading: str, section: str) -> str:
    """``text`` with the section under ``heading`` replaced by ``section`` (appended if absent);
    a section runs from its heading to the next ``## `` heading or the end."""
    lines = text.splitlines(keepends=True)
    heads = _heading_lines(lines)
    start = next((i for i in heads if lines[i].rstrip() == heading), None)
    body = section.rstrip("\n") + "\n"
    if start is None:
        return text.rstrip("\n") + "\n\n" + body
    end = next((i for i in heads if i > start), len(lines))
    if end < len(lines):
        body += "\n"
    return "".join(lines[:start]) + body + "".join(lines[end:])


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace (or append) one section, leaving every other as it is. The file is read just
    before writing (other scripts own other sections) and replaced atomically."""
    text = path.read_text() if path.exists() else INTRO
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(replace_section(text, heading, section))
    os.replace(tmp, path)
