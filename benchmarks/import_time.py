"""Wall time of ``import aioproj`` and ``aioproj --help`` in fresh interpreters.

Printed next to the floor of a bare interpreter (``python -c pass``) and of ``import
asyncio`` (which anyio, and so aioproj, needs), median of ``--reps`` runs each.

    python benchmarks/import_time.py

Targets (DESIGN.md §5): ``import aioproj`` ≤ 100 ms; ``aioproj --help`` ≤ 250 ms.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import asyncio": [sys.executable, "-c", "import asyncio"],
    "import aioproj": [sys.executable, "-c", "import aioproj"],
    "aioproj --help": [sys.executable, "-m", "aioproj", "--help"],
    "aioproj run --help": [sys.executable, "-m", "aioproj", "run", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    for name, argv in CASES.items():
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        print(
            f"{name:<22} {statistics.median(times) * 1000:7.1f} ms  (min {min(times) * 1000:.1f})"
        )


if __name__ == "__main__":
    main()
