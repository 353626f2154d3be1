"""
A heap setting that makes CPU training steps a little faster (about 4%, docs/performance.md),
used by extras/bench.py; the stages leave the heap as it is. (The other CPU setting,
OMP_WAIT_POLICY=PASSIVE, is nanosft.py's first line of code: it must come before torch loads.)
"""
import ctypes


def keep_freed_memory():
    """glibc keeps freed memory in the heap instead of handing large blocks back to the
    operating system, so a training step stops taking page faults for its activation
    buffers; a process then keeps its peak memory until it exits. glibc only."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB come from the heap
    mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GiB of freed heap
