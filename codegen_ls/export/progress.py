"""What the export tells the user as it goes (one line per step on stderr) and gives back to the OS."""

from __future__ import annotations

import sys


def step(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def return_freed_memory(start: bool = False) -> None:
    """glibc: big buffers (a weight, a layer's activations) mapped on their own, so freeing one
    gives its memory back to the system (``start``: past 16 MB, instead of glibc's threshold that
    grows with each freed buffer and leaves them in the heap); and what the heap holds free now
    returned. The export's peak is then what it holds at once, not all it has held. Elsewhere: nothing."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        if start:
            libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
