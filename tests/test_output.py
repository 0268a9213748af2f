"""RunOutput: line splitting, bounded memory, live readers, and an echo that never blocks."""

from __future__ import annotations

import io
import time

import anyio
import pytest

from aioproj._output import RunOutput

pytestmark = pytest.mark.anyio


async def _all(output: RunOutput) -> list[str]:
    return [line async for line in output.lines()]


async def test_lines_are_split_across_chunks() -> None:
    output = RunOutput("r", echo="off")
    for chunk in (b"one\ntw", b"o\n", b"thr", b"ee"):
        output.feed(chunk)
    output.close()
    assert await _all(output) == ["one\n", "two\n", "three\n"]


async def test_memory_keeps_the_start_and_the_end() -> None:
    output = RunOutput("r", echo="off", max_bytes=200)
    for n in range(100):
        output.feed(f"line {n:03d}\n".encode())
    output.close()
    lines = await _all(output)
    assert lines[0] == "line 000\n"
    assert lines[-1] == "line 099\n"  # the end (a traceback) is kept
    [marker] = [line for line in lines if "dropped" in line]
    assert marker == f"[aioproj: {output.dropped} lines dropped here]\n"
    assert len(lines) - 1 + output.dropped == 100
    assert output.text() == "".join(lines)


async def test_an_endless_line_is_cut_not_grown() -> None:
    output = RunOutput("r", echo="off")
    for _ in range(2000):
        output.feed(b"\r progress 50% " * 10)
    output.close()
    lines = await _all(output)
    assert all(len(line) <= 70 * 1024 for line in lines)
    assert sum(len(line) for line in lines) >= 2000 * 150


async def test_live_reader_sees_lines_as_they_come() -> None:
    output = RunOutput("r", echo="off")
    seen: list[str] = []

    async def read() -> None:
        async for line in output.lines():
            seen.append(line)

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        output.feed(b"a\n")
        await anyio.wait_all_tasks_blocked()
        assert seen == ["a\n"]
        output.feed(b"b\nc")
        output.close()
    assert seen == ["a\n", "b\n", "c\n"]


class _SlowStream(io.StringIO):
    """A stdout whose reader is slow: each write takes a while."""

    def write(self, text: str) -> int:
        time.sleep(0.3)  # runs in the echo thread, never on the loop
        return super().write(text)


@pytest.mark.allow_blocking  # the stream blocks on purpose, in the echo thread
async def test_slow_stdout_does_not_stall_the_event_loop() -> None:
    stream = _SlowStream()
    output = RunOutput("run1", stream=stream)
    expected = "".join(f"[run1] {n}\n" for n in range(5))
    for n in range(5):
        output.feed(f"{n}\n".encode())
    # feed() returned before the slow writes could have happened: they were handed off.
    assert stream.getvalue() != expected
    output.close()
    with anyio.fail_after(10):
        from aioproj._output import _echo

        await _echo.drain()
    assert stream.getvalue() == expected
