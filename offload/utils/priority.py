"""Background work at a lower CPU priority than training.

A checkpoint's writer thread, the threads that copy records into its staging ring and the threads
that sum their crc32s all run while training does. Training's host work (folding gradients,
CPU AdamW, the engine's copies) runs torch's OpenMP parallel regions, which wait for their
slowest thread: a writer thread that takes a core from one of them delays the whole region. On
Linux a thread's nice value is its own (``setpriority`` on its thread id), so the writer's
threads give way to training's and still use every core training leaves idle (it mostly waits
for the device).
"""

from __future__ import annotations

import os
import sys
import threading

BACKGROUND_NICE = 10
"""How much lower than its creator's priority a background thread runs (nice 0 -> 10: a tenth
of a training thread's share of a contended core)."""
MAX_NICE = 19


def lower_thread_priority(by: int = BACKGROUND_NICE) -> bool:
    """Sets the calling thread's nice value ``by`` above the main thread's (up to 19; never
    lower than it is: a thread made by a background thread starts with its nice value). False
    where that cannot be done (not Linux, or refused), and then the thread runs on unchanged."""
    main = threading.main_thread().native_id
    if sys.platform != "linux" or by <= 0 or main is None:
        return False
    tid = threading.get_native_id()
    try:
        target = min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, main) + by)
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError:
        return False
    return True


def thread_nice() -> int:
    """The calling thread's nice value (0 where it cannot be read)."""
    if sys.platform != "linux":
        return 0
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except OSError:
        return 0
