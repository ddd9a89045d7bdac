"""What each rank's device reports (a service instance's metrics, the GPU check): memory in use
and in all, and on NVIDIA GPUs (NVML, through nvidia-ml-py, the serve extra's) utilization,
temperature, power and the reasons its clocks are held down. Readings a device cannot give are
left out, never faked: a CPU "device" reports its process' resident memory and the machine's,
nothing else.

A sample is a plain dict, so a rank group's peers can send theirs to rank 0 with the messages
they already exchange (serve/engine.py), and one instance exports every rank's device."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

# NVML's clocks-event (throttle) bits, grouped by the name the metric's `reason` label carries.
# "thermal" (software or hardware thermal slowdown) and "hw_slowdown" (the board's own slowdown
# or power brake) are the ones that mean a hot or failing board: the thermal alert's.
THROTTLE_BITS = {
    "idle": ("nvmlClocksEventReasonGpuIdle",),
    "app_clocks": ("nvmlClocksEventReasonApplicationsClocksSetting",),
    "power": ("nvmlClocksEventReasonSwPowerCap",),
    "hw_slowdown": ("nvmlClocksEventReasonHwSlowdown", "nvmlClocksEventReasonHwPowerBrakeSlowdown"),
    "sync_boost": ("nvmlClocksEventReasonSyncBoost",),
    "thermal": ("nvmlClocksEventReasonSwThermalSlowdown",
                "nvmlClocksEventReasonHwThermalSlowdown"),
}


def sample(device: torch.device, rank: int) -> dict[str, Any]:
    """This rank's device now: {"rank", "device", "memory", "memory_limit", and where NVML
    answers "utilization", "temperature", "power", "throttled": {reason: 0 or 1}}."""
    reading: dict[str, Any] = {"rank": rank, "device": str(device)}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        reading["device"] = f"cuda:{index}"
        reading["memory"] = torch.cuda.memory_reserved(index)  # what the caching allocator holds
        reading["memory_limit"] = torch.cuda.get_device_properties(index).total_memory
        reading.update(nvml_readings(index))
    elif device.type == "cpu":
        reading.update(cpu_memory())
    return reading


def cpu_memory() -> dict[str, int]:
    """The process' resident set and the machine's memory (Linux /proc; {} elsewhere)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/statm") as fh:
            out["memory"] = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    out["memory_limit"] = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return out


def nvml_readings(index: int) -> dict[str, Any]:
    """NVML's readings of CUDA device `index` ({} without NVML). The device is found by its
    UUID, so CUDA_VISIBLE_DEVICES' renumbering cannot mix two boards up."""
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    except Exception as err:  # no driver library, no NVML: the gauges stay absent
        log.debug("no NVML readings for cuda:%d (%s)", index, err)
        return {}
    out: dict[str, Any] = {}
    reads = {
        "utilization": lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
        "temperature": lambda: pynvml.nvmlDeviceGetTemperature(handle,
                                                               pynvml.NVML_TEMPERATURE_GPU),
        "power": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # mW -> W
        "throttled": lambda: throttle_reasons(
            pynvml, pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)),
    }
    for name, read in reads.items():
        try:  # a board may not support one reading (power on some); the others still count
            out[name] = read()
        except Exception as err:
            log.debug("NVML %s of cuda:%d: %s", name, index, err)
    return out


def throttle_reasons(nvml: Any, mask: int) -> dict[str, int]:
    """NVML's bit mask as {reason: 1 if active else 0}, every known reason listed."""
    return {reason: int(any(mask & getattr(nvml, bit, 0) for bit in bits))
            for reason, bits in THROTTLE_BITS.items()}
