"""What every benchmark prints with its table: the machine and the peers' versions."""

import os
import subprocess
from pathlib import Path


def machine() -> str:
    """Cores and CPU model."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}"


def version(argv) -> str:
    """The first line a tool prints about its version (stdout or stderr)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"
