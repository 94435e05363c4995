"""Where every benchmark's tables go: its own section of benchmarks/results.md, with how and where it was measured.

Each script replaces only its own section (between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``), so one
benchmark's run never erases another's tables.
"""

import os
import platform
import re
import shlex
import subprocess
import sys
import time

import torch

DEFAULT_PATH = "benchmarks/results.md"


def provenance() -> list[str]:
    """The command, machine, software and commit of this run, as markdown list lines."""
    return [
        f"- command: `python {shlex.join(sys.argv)}`, {time.strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {os.cpu_count()} cores, {cpu_model()}; 1-min load average at the end: {os.getloadavg()[0]:.2f}",
        f"- python {platform.python_version()}, torch {torch.__version__}, git {git_head()}",
    ]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def git_head() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except Exception:  # noqa: BLE001 - not a checkout: the line just says so
        return "?"


def write_section(name: str, text: str, path: str = DEFAULT_PATH) -> None:
    """Put ``text`` in section ``name`` of ``path`` (replacing that section, or appending it); keeps the rest."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = open(path).read() if os.path.exists(path) else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: block, old, count=1) if pattern.search(old) else old + ("\n" if old else "") + block
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(new)
    print(f"written to section {name!r} of {path}")
