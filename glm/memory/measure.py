"""What a run actually used and what the machine has free: on a GPU Paddle's own counters; on a CPU the
process's peak resident memory (what the kernel's OOM killer looks at) and Paddle's CPU allocator peak (the
tensors alone)."""

import os
import resource
from typing import Optional

import paddle

__all__ = ["on_gpu", "peak_memory_bytes", "peak_tensor_bytes", "current_memory_bytes", "available_memory_bytes",
           "reset_peaks"]  # fmt: skip


def on_gpu() -> bool:
    return paddle.device.is_compiled_with_cuda() and "gpu" in paddle.device.get_device()


def peak_memory_bytes() -> int:
    """GPU: the most Paddle's allocator held for tensors; CPU: the process's peak resident memory."""
    if on_gpu():
        return int(paddle.device.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_tensor_bytes() -> int:
    """The most memory Paddle's allocator handed out for tensors, since the start or `reset_peaks`."""
    if on_gpu():
        return int(paddle.device.cuda.max_memory_allocated())
    from paddle.base import core

    return int(core.host_memory_stat_peak_value("Allocated", 0))


def reset_peaks():
    """Start the tensor peak afresh (the process's resident peak cannot be reset)."""
    if on_gpu():
        paddle.device.cuda.reset_max_memory_allocated()
        return
    from paddle.base import core

    core.host_memory_stat_reset_peak_value("Allocated", 0)


def current_memory_bytes() -> int:
    """What this process holds now: GPU, Paddle's allocated tensors; CPU, the resident memory."""
    if on_gpu():
        return int(paddle.device.cuda.memory_allocated())
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def available_memory_bytes() -> Optional[int]:
    """What more this process could take: a GPU's free memory, or the CPU's available memory (MemAvailable:
    free plus what the kernel can reclaim, the figure `free` shows); None where it cannot be read."""
    if on_gpu():
        try:
            free, _ = paddle.device.cuda.mem_get_info()
            return int(free)
        except Exception:  # noqa: BLE001  (an older Paddle without mem_get_info)
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
