"""NVML's readings of a GPU become the instance's labelled gauges: a fake NVML module stands in
for the driver (no GPU here); the GPU check reads a real one."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from paraflow import devices
from paraflow.serve.metrics import InstanceMetrics


class FakeNvml:
    """The pynvml calls devices.py makes, answering like a hot board whose power reading is
    not supported."""

    nvmlClocksEventReasonGpuIdle = 0x1
    nvmlClocksEventReasonApplicationsClocksSetting = 0x2
    nvmlClocksEventReasonSwPowerCap = 0x4
    nvmlClocksEventReasonHwSlowdown = 0x8
    nvmlClocksEventReasonSyncBoost = 0x10
    nvmlClocksEventReasonSwThermalSlowdown = 0x20
    nvmlClocksEventReasonHwThermalSlowdown = 0x40
    nvmlClocksEventReasonHwPowerBrakeSlowdown = 0x80
    NVML_TEMPERATURE_GPU = 0

    def __init__(self) -> None:
        self.uuids: list[str] = []

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        self.uuids.append(uuid)
        return uuid

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        return 83

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: str) -> int:
        return self.nvmlClocksEventReasonHwThermalSlowdown | self.nvmlClocksEventReasonSwPowerCap


def test_nvml_readings_become_labelled_gauges(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(uuid=f"uuid-of-{index}"))
    readings = devices.nvml_readings(1)
    assert nvml.uuids == ["GPU-uuid-of-1"]  # found by UUID, not by NVML's own numbering
    assert "power" not in readings  # unsupported: absent, and the other readings still come
    assert readings["temperature"] == 83 and readings["utilization"] == 87
    assert readings["throttled"] == {"idle": 0, "app_clocks": 0, "power": 1, "hw_slowdown": 0,
                                     "sync_boost": 0, "thermal": 1}

    metrics = InstanceMetrics()
    metrics.record_devices([{"rank": 1, "device": "cuda:1", "memory": 5e9,
                             "memory_limit": 8e10, **readings}])
    value = metrics.registry.get_sample_value
    labels = {"rank": "1", "device": "cuda:1"}
    assert value("paraflow_device_temperature_celsius", labels) == 83
    assert value("paraflow_device_memory_bytes", labels) == 5e9
    assert value("paraflow_device_throttled", {**labels, "reason": "thermal"}) == 1
    assert value("paraflow_device_throttled", {**labels, "reason": "hw_slowdown"}) == 0
    assert value("paraflow_device_power_watts", labels) is None


def test_without_nvml_a_gpu_reports_memory_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` fails
    assert devices.nvml_readings(0) == {}
