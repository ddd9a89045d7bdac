"""Memory figures per rank: the process peak, and the working memory of generation alone (the
peak during generation above what was held when it began: activations, buffers, transfers).

On CUDA these are the caching allocator's counters. On CPU they come from Linux's /proc: the
peak resident set (VmHWM) is reset when generation starts, by writing 5 to /proc/self/clear_refs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def process_peak_bytes(device: torch.device) -> int:
    """The whole process's peak (weights, runtime, activations)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def start_window(device: torch.device) -> int | None:
    """Reset the peak counter; return the bytes held now (None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def window_peak_bytes(device: torch.device, held_at_start: int | None) -> int | None:
    """Peak bytes above `held_at_start` since start_window."""
    if held_at_start is None:
        return None
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)) - held_at_start
    peak = _status_bytes("VmHWM")
    return None if peak is None else peak - held_at_start


def track_live_tensors() -> bool:
    """Make this process's resident set follow its live tensors (CPU, glibc): blocks of 64 KiB
    and more get their own mappings and go back to the system when freed, instead of staying in
    the heap, so VmHWM measures the peak of what was alive. It slows allocation (about 1.5× on
    a small model), so memory passes of a benchmark use it, timed passes do not. Returns whether
    it took effect; it lasts for the life of the process."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, 64 * 1024))
