"""Process-level performance settings for CPU training.

**The CPU allocator.**  A Conv-4 step on 256 images × 2 views holds activations of 512 × 64 × 28 × 28 floats =
100 MB.  glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
returns it with ``munmap`` when freed, so *every* such tensor costs ~25 000 page faults: measured here, ``a * 2``
on one of them takes 41 ms with a fresh output and 5 ms into a preallocated one.  Elementwise-heavy work (BatchNorm
and its double backward in the bi-level engines) is dominated by this.  :func:`tune_cpu_allocator` tells glibc
(``mallopt``) to serve large blocks from the heap and to keep freed memory for reuse (``M_MMAP_MAX = 0``,
``M_TRIM_THRESHOLD`` = 2 GiB): the next tensor of the same size reuses the pages.  Measured on the 2-core CPU
(one thread): a SimCLR step 0.72 s → 0.43 s; the numbers computed are unchanged (only where memory comes from).

Cost: the process keeps freed heap instead of returning it to the OS, and fragmentation can make it grow far
beyond the live tensors: a GeSSL ``aid_cg`` step with 829 MB of live tensors left the process at 10 GB resident.
So it is **opt-in**: set ``BILEVEL_SSL_MALLOC=reuse`` in the environment (the trainer and the benchmark then
call it); without it glibc's behaviour is kept.  It is a no-op on non-glibc platforms (macOS, Windows) and does not affect CUDA memory.
Because freed blocks are kept, a process that trains many differently-sized models one after another can grow
(a benchmark of 17 configurations reached 17 GB resident before this was handled): :func:`release_memory`, called
by the trainer at the end of every run and by the benchmark after every case, hands all free heap pages back
(``malloc_trim``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_state: dict[str, object] = {"tuned": None}
ENV = "BILEVEL_SSL_MALLOC"


def tune_cpu_allocator() -> bool:
    """Make glibc reuse freed large blocks (see the module docstring).  Returns True when the settings are in
    effect (now or from an earlier call), False where they do not apply or ``$BILEVEL_SSL_MALLOC`` is not
    ``reuse``.  Idempotent."""
    if os.environ.get(ENV, "").lower() != "reuse":
        return False
    if _state["tuned"] is not None:
        return bool(_state["tuned"])
    ok = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        mallopt = None
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    _state["tuned"] = ok
    return ok


def release_memory() -> None:
    """Collect garbage and return every free heap page to the OS (glibc ``malloc_trim(0)``; no-op elsewhere)."""
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


THREADS_ENV = "BILEVEL_SSL_THREADS"
DEFAULT_THREADS = 2


def pinned_threads() -> int:
    """The CPU thread count that ``make reproduce`` and ``make test`` use: ``$BILEVEL_SSL_THREADS``, else 2.

    Float32 results depend on the thread count (reductions are split into per-thread partial sums), so a
    number must not depend on how many cores the machine has or on what else runs on it.  2 is the size of the
    machines this project is built and tested on; set ``BILEVEL_SSL_THREADS`` to use more (the count is recorded
    in ``metrics.json`` and is part of the encoder-cache key, so runs with another count are kept apart)."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return DEFAULT_THREADS
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{THREADS_ENV}: must be a whole number >= 1, got {raw!r}")
    return int(raw)


def pin_threads() -> int:
    """Pin torch's intra-op threads in this process *and* in the processes it starts (notebook kernels,
    workers: through ``OMP_NUM_THREADS``, which torch reads at start-up) to :func:`pinned_threads`.  Returns it."""
    import torch

    n = pinned_threads()
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return n
