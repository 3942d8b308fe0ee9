"""The price fix of the replay story, as a price-table file: the shipped table plus version
"2026-10-01" in which Haiku 3.5 input is $1.00 (it was $0.80) and Opus 4.1 output is $60 (it was
$75), everything else as before. Used by the replay tests and the replay benchmark."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIX_VERSION = "2026-10-01"
FIX_INSTANT = "2026-10-01T00:00:00Z"


def corrected_table(directory: Path) -> Path:
    """Write the corrected table into ``directory`` and return its path."""
    text = (REPO / "data" / "price_table.toml").read_text()
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line.strip() == "[[versions]]")
    version = "\n".join(lines[start:])
    version = version.replace('id = "2025-01-01"', f'id = "{FIX_VERSION}"', 1)
    version = version.replace(
        'effective_from = "2025-01-01T00:00:00Z"', f'effective_from = "{FIX_INSTANT}"', 1
    )
    haiku = version.index('[versions.families."haiku-3.5"]')
    version = version[:haiku] + version[haiku:].replace('input = "0.80"', 'input = "1"', 1)
    opus = version.index('[versions.families."opus-4.1"]')
    version = version[:opus] + version[opus:].replace('output = "75"', 'output = "60"', 1)
    path = directory / "price_table_fixed.toml"
    path.write_text(text + "\n\n" + version + "\n")
    return path
