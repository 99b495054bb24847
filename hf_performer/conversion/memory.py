"""Peak memory of one call, in process.

CUDA: ``torch.cuda.max_memory_allocated()`` growth (tensors only). CPU (Linux): growth of the resident set's
high-water mark during the call — reset the mark (``echo 5 > /proc/self/clear_refs``), read VmRSS, call,
read VmHWM. Large buffers are made their own mappings (glibc ``mallopt(M_MMAP_THRESHOLD, 64 KiB)``) so freed
tensors leave the resident set and the number follows live tensors; ``relax_malloc`` puts the allocator back
afterwards. Elsewhere: ``None``.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _malloc_thresholds(mmap_bytes: int, trim_bytes: int, trim_now: bool = False) -> None:
    """glibc mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD) (and malloc_trim); a no-op without glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes)
        if trim_now:
            libc.malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _proc_kib_field(path: str, field: str) -> int | None:
    """``field: N kB`` of a /proc file, in bytes; None where the file or field is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def proc_status(field: str) -> int | None:
    """A size field of /proc/self/status (``VmRSS``, ``VmHWM``, ``VmSize``) in bytes; None off Linux."""
    return _proc_kib_field("/proc/self/status", field)


def reset_peak_rss() -> bool:
    """Make glibc map/unmap blocks >= 64 KiB one by one and return freed memory at once, then reset VmHWM to
    the current resident set. False where the mark cannot be reset (not Linux)."""
    _malloc_thresholds(1 << 16, 1 << 17, trim_now=True)
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
    _malloc_thresholds(32 << 20, 64 << 20)


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None off Linux."""
    return _proc_kib_field("/proc/meminfo", "MemAvailable")


def peak_memory(call, device: torch.device) -> tuple[int | None, str]:
    """(peak bytes above the level before the call, method) for ``call()``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda max_memory_allocated growth"
    if not reset_peak_rss():  # first: its malloc_trim may shrink the resident set the baseline is read from
        relax_malloc()
        return None, "unavailable (no /proc/self/clear_refs)"
    base = proc_status("VmRSS")
    try:
        call()
        hwm = proc_status("VmHWM")
    finally:
        relax_malloc()
    if base is None or hwm is None:
        return None, "unavailable"
    return max(0, hwm - base), "resident-set high-water mark growth (Linux)"
