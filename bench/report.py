"""A benchmark's report: its markdown lines printed, then written as NAME.md beside NAME.json."""
from __future__ import annotations

import json
from pathlib import Path


def write_report(out: str | Path | None, name: str, lines: list[str], data) -> None:
    """`out` None: printed only."""
    print("\n".join(lines))
    if out is None:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
