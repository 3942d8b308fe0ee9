"""Create ``.venv-quix``: the separate virtualenv of the Quix Streams benchmark app.

Run: ``python3.11 benchmarks/quix/setup_venv.py`` (or ``make quix-venv``) from the repository.

quixstreams 3.28.1 pins confluent-kafka<2.13, pydantic<2.14 and pydantic-settings<2.16,
older than the main ``.venv`` (``constraints.txt``), so the comparison app gets its own venv
with the exact pins of ``benchmarks/quix/constraints.txt``. Idempotent: a marker file holding
the constraints' SHA-256 skips the install when nothing changed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-quix"
CONSTRAINTS = Path(__file__).resolve().with_name("constraints.txt")
MARKER = VENV / ".installed"

# What benchmarks/quix/app.py imports, directly or through core/, streams/codec.py and sinks/.
REQUIREMENTS = (
    "quixstreams==3.28.1",
    "fastavro",
    "orjson",
    "pydantic-settings",
    "clickhouse-connect",
    "chdb",
    "chdb-core",
    "rocksdict",
    "aiokafka",  # streams.topics (the topic names) imports its murmur2
)


def main() -> int:
    digest = hashlib.sha256(CONSTRAINTS.read_bytes() + "\n".join(REQUIREMENTS).encode()).hexdigest()
    python = VENV / "bin" / "python"
    if MARKER.exists() and MARKER.read_text().strip() == digest and python.exists():
        print(f"{VENV.relative_to(REPO)} is up to date")
        return 0
    interpreter = os.environ.get("PYTHON") or shutil.which("python3.11") or sys.executable
    if not python.exists():
        subprocess.run([interpreter, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-c", str(CONSTRAINTS), *REQUIREMENTS], check=True)
    MARKER.write_text(digest + "\n")
    print(f"installed {VENV.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
