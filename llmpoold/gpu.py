"""Memory readings: GPU memory through NVML (pynvml from nvidia-ml-py), process RSS
through /proc. Never raises: a host without an NVIDIA driver answers with no GPUs
and an error string."""

from __future__ import annotations

import os
from typing import Any


def gpu_memory() -> tuple[list[dict[str, Any]], str | None]:
    """Return (gpus, error). Each GPU: index, name, used_mib, total_mib, used_over_total."""
    try:
        import pynvml
    except ImportError:
        return [], "pynvml is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded...
        return [], f"NVML unavailable: {exc}"
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            used, total = int(info.used // 2**20), int(info.total // 2**20)
            gpus.append({"index": index, "name": name.decode() if isinstance(name, bytes) else name,
                         "used_mib": used, "total_mib": total, "used_over_total": f"{used}MiB / {total}MiB"})
        return gpus, None
    except Exception as exc:  # noqa: BLE001
        return [], f"NVML query failed: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def primary_gpu_used_mib() -> int | None:
    gpus, _ = gpu_memory()
    return gpus[0]["used_mib"] if gpus else None


def process_vram_mib(pid: int) -> float | None:
    """VRAM used by one process across GPUs, or None when it cannot be measured."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001
        return None
    try:
        total = 0
        found = False
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory:
                    total += proc.usedGpuMemory
                    found = True
        return round(total / 2**20, 1) if found else None
    except Exception:  # noqa: BLE001
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def process_rss_mib(pid: int | None = None) -> float | None:
    """Resident memory of a process in MiB (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid or os.getpid()}/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
        return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None
