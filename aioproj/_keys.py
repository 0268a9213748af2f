"""Random keys for runs (a run's journal key, the file store's run id), cheaply.

Every run needs a 128-bit random key, in MLflow's run id shape (32 hex digits). Asking
the kernel for 16 bytes per run is a system call each on the event loop; a burst of
runs draws them from one buffer of random bytes, refilled 256 keys at a time.
"""

from __future__ import annotations

import os
import threading

__all__ = ["new_key"]

_KEY_BYTES = 16
_buffer = bytearray()
_lock = threading.Lock()


def new_key() -> str:
    """32 random hex digits (128 bits from ``os.urandom``). Safe from any thread."""
    if not _lock.acquire(blocking=False):  # another thread draws now: ask the kernel
        return os.urandom(_KEY_BYTES).hex()
    try:
        if not _buffer:
            _buffer.extend(os.urandom(_KEY_BYTES * 256))
        key = bytes(_buffer[:_KEY_BYTES])
        del _buffer[:_KEY_BYTES]
    finally:
        _lock.release()
    return key.hex()
