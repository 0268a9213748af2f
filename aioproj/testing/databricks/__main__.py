"""``python -m aioproj.testing.databricks [--port N] [--token T]``: serve until Ctrl-C
(SIGINT) or SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys

import anyio

from ._server import FakeDatabricks


async def _serve(port: int, token: str | None) -> None:
    async with FakeDatabricks(port=port, token=token) as ws:
        print(ws.host, flush=True)
        print(
            f"export DATABRICKS_HOST={ws.host} DATABRICKS_TOKEN={ws.token}",
            file=sys.stderr,
            flush=True,
        )
        # Ctrl-C or a polite kill: leave the context, which stops the runs' processes.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aioproj.testing.databricks",
        description="Serve an emulated Databricks workspace on 127.0.0.1 until interrupted.",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    parser.add_argument("--token", default=None, help="the personal access token to accept")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(_serve, args.port, args.token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
