"""
What the CPU can do and two settings that make CPU runs faster (measured: docs/performance.md).

    cpu_has_native_bf16()   bf16 matmuls in hardware? (runtime.pick_dtype asks)
    tune_cpu()              a script's first call when run from the command line
"""
import ctypes
import os
import sys
import time

import torch


def cpu_has_native_bf16():
    """True when this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX). Where
    bf16 is emulated (AVX2) it is hundreds of times slower than fp32, so this checks, never
    assumes: /proc/cpuinfo on Linux, a timing elsewhere. A CPU limited to AVX2
    (ATEN_CPU_CAPABILITY=avx2) has none."""
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2", "NO AVX"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        a32 = torch.randn(256, 256)
        a16 = a32.bfloat16()

        def seconds(a):
            start = time.perf_counter()
            for _ in range(10):
                a @ a
            return time.perf_counter() - start
        seconds(a32), seconds(a16)
        return seconds(a16) < seconds(a32)


def tune_cpu():
    """Two settings; importing a module changes nothing, a script calls this first thing.

    1. OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep between ops instead of spinning, which
       on shared cores steals the core from the thread they wait for. OpenMP reads it only
       when torch loads, so when it is not set the process restarts itself once with it set
       (same arguments, same process id). Set it yourself (to anything) to skip the restart.
    2. glibc keeps freed memory in the heap instead of handing large blocks back to the
       operating system, so a training step stops taking page faults for its activation
       buffers; a process then keeps its peak memory until it exits. glibc only."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GiB come from the heap
    mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: keep up to 2 GiB of freed heap
