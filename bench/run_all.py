"""Run every benchmark (or `--only NAME`), each in its own process, and print one results table.

    .venv/bin/python bench/run_all.py [--only NAME[,NAME]] [--quick] [--out results.md]

Measurements, not tests: a figure that misses its goal is reported, never failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, Row, pg_version, table

BENCHMARKS = (
    "transcribe",
    "stage_gap",
    "overhead",
    "resume",
    "upload_memory",
    "recovery",
    "fan_out",
    "backlog",
    "temporal",
    "live",
)


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    try:
        pg = pg_version()
    except Exception as exc:
        pg = f"unavailable ({type(exc).__name__})"
    return (
        f"{os.cpu_count()} CPU(s), {cpu}, {mem_kib / 1024 / 1024:.1f} GiB RAM, "
        f"Python {platform.python_version()}, PostgreSQL {pg}, {platform.platform()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    names = BENCHMARKS
    if args.only:
        names = tuple(name.strip() for name in args.only.split(",") if name.strip())
        unknown = [name for name in names if name not in BENCHMARKS]
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    load_before = os.getloadavg()
    rows: list[Row] = []
    durations: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vp-bench-results-") as results:
        for name in names:
            out = Path(results) / f"{name}.json"
            command = [sys.executable, str(REPO / "bench" / f"{name}.py"), "--json", str(out)]
            if args.quick:
                command.append("--quick")
            print(f"== {name}", flush=True)
            started = time.monotonic()
            done = subprocess.run(command, cwd=REPO, env=env, check=False)
            durations.append(f"{name} {time.monotonic() - started:.0f} s")
            if done.returncode == 0 and out.exists():
                rows += [Row(**row) for row in json.loads(out.read_text())]
            else:
                rows.append(
                    Row(name, "benchmark crashed", f"exit {done.returncode}", verdict="ERROR")
                )
    report = "\n".join(
        [
            f"Machine: {machine()}",
            "",
            table(rows),
            "",
            "Wall time per benchmark: " + ", ".join(durations),
            f"Load average (1 min) before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} "
            "(other processes on the machine skew the absolute figures; ratios are measured "
            "back to back in the same run)",
        ]
    )
    print("\n" + report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
