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

_M_MMAP_THRESHOLD = -3
_MALLOPT_DONE = False


def _mallopt() -> None:
    global _MALLOPT_DONE
    if not _MALLOPT_DONE:
        _MALLOPT_DONE = True
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(_M_MMAP_THRESHOLD, 65536)
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            pass


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
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
    _mallopt()
    base = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None, "unavailable (no /proc/self/clear_refs)"
    call()
    hwm = _status("VmHWM")
    if base is None or hwm is None:
        return None, "unavailable"
    return max(0, hwm - base), "resident-set high-water mark growth (Linux)"
