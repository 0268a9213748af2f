"""Cancel N running local runs at once: how long until every process group is gone and
every run is recorded KILLED.

    python benchmarks/cancel_sweep.py            # N = 200
    python benchmarks/cancel_sweep.py -n 50

Each run is ``sleep 600``, which exits on SIGTERM, so the time measured is aioproj's own
(signals, reaping, tracking writes), not a grace period. Target (DESIGN.md §5): all dead
and recorded KILLED within 1 s (after the grace period).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

MLPROJECT = """
entry_points:
  main:
    command: "sleep 600"
"""


async def main(n: int) -> None:
    import aioproj

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "p"
        project.mkdir()
        (project / "MLproject").write_text(MLPROJECT)
        store = (Path(tmp) / "mlruns").as_uri()
        async with aioproj.Runner(tracking_uri=store, echo="off", grace_period=5) as runner:
            runs = await asyncio.gather(
                *(
                    runner.run(str(project), synchronous=False, env_manager="local")
                    for _ in range(n)
                )
            )
            await asyncio.sleep(0.5)  # let every shell exec its sleep
            start = time.perf_counter()
            await runner.cancel_all()
            elapsed = time.perf_counter() - start
        statuses = {str(await run.get_status()) for run in runs}
        left = await asyncio.to_thread(_count_sleepers)
    print(
        f"cancelled {n} runs in {elapsed:.3f} s; statuses {sorted(statuses)}; "
        f"'sleep 600' processes left: {left}"
    )


def _count_sleepers() -> int:
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == b"sleep\x00600\x00":
                    count += 1
        except OSError:
            pass
    return count


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200)
    asyncio.run(main(parser.parse_args().n))
