"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections alone.

Each script owns the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

REPORT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Written by the scripts in `benchmarks/`; each section says the machine it ran on. Two implementations\n"
    "are always measured in the same process, interleaved, and compared by the ratio of medians: an\n"
    "absolute time or MFU holds only for the machine named beside it.\n"
)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cores = len(__import__("os").sched_getaffinity(0))
    return f"CPU only: {platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}"


def write_section(name: str, body: str, report: Path = REPORT) -> Path:
    report.parent.mkdir(parents=True, exist_ok=True)
    text = report.read_text(encoding="utf-8") if report.exists() else HEADER
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    report.write_text(text, encoding="utf-8")
    return report
