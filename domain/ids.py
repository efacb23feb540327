"""Time-ordered ids (UUID version 7, RFC 9562), monotonic within a process.

Subtasks spawned by one handler are inserted in one statement and share `created_at`; ordering
children by (created_at, id) then gives the order they were spawned in. New rows also land at
the right edge of the primary-key index instead of at random places in it.
"""

from __future__ import annotations

import os
import threading
import time
from uuid import UUID

_lock = threading.Lock()
_last_ms = 0
_counter = 0
_COUNTER_MAX = 0xFFF


def new_id() -> UUID:
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = int.from_bytes(os.urandom(2)) & 0x7FF  # random start, headroom to count
        else:
            _counter += 1
            if _counter > _COUNTER_MAX:  # more than ~2000 ids in one millisecond
                _last_ms += 1
                _counter = 0
        ms, counter = _last_ms, _counter
    tail = int.from_bytes(os.urandom(8)) & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | tail
    return UUID(int=value)
