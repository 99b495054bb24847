"""Peak memory of one call, in process.

CUDA: ``torch.cuda.max_memory_allocated()`` growth (tensors only). CPU (Linux): growth of the resident set's
high-water mark during the call — VmRSS before, reset the mark (``echo 5 > /proc/self/clear_refs``), call,
read VmHWM. Large buffers are made their own mappings (glibc ``mallopt(M_MMAP_THRESHOLD, 64 KiB)``) so freed
tensors leave the resident set and the number follows live tensors. Elsewhere: ``None``.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def proc_status(field: str) -> int | None:
    """A size field of /proc/self/status (``VmRSS``, ``VmHWM``, ``VmSize``) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Make glibc map/unmap blocks >= 64 KiB one by one and return freed memory at once, then reset VmHWM to
    the current resident set. False where the mark cannot be reset (not Linux)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 17)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def relax_malloc() -> None:
    """Undo ``reset_peak_rss``'s allocator settings after a measurement: with every block >= 64 KiB mapped and
    unmapped one by one, training runs spend most of their time in the kernel (measured: calibration steps
    twice as slow). 32 MiB / 64 MiB are where glibc's own dynamic thresholds settle on 64-bit Linux."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_memory(call, device: torch.device) -> tuple[int | None, str]:
    """(peak bytes above the level before the call, method) for ``call()``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda max_memory_allocated growth"
    base = proc_status("VmRSS")
    if not reset_peak_rss():
        return None, "unavailable (no /proc/self/clear_refs)"
    try:
        call()
        hwm = proc_status("VmHWM")
    finally:
        relax_malloc()
    if base is None or hwm is None:
        return None, "unavailable"
    return max(0, hwm - base), "resident-set high-water mark growth (Linux)"
