"""The line naming what a benchmark ran on; imports nothing that sets up Paddle (bench/shipped.py's parent
process prints it without importing paddle)."""

import os
import sys


def paddle_threads() -> str:
    """The threads Paddle's CPU kernels use here: what glm.cli.process set, else the environment's (Paddle
    pins 1 at import when it is unset)."""
    process = sys.modules.get("glm.cli.process")
    return str(process.compute_threads() if process else os.environ.get("OMP_NUM_THREADS", 1))


def describe_machine():
    """CPU model, cores, load average, and the two settings that change Paddle's CPU speed."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            models = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
    except OSError:
        models = []
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"{models[0] if models else 'unknown CPU'}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} cores, "
            f"load average {load} (1, 5, 15 min); threads={paddle_threads()}, "
            f"MKL_DEBUG_CPU_TYPE={os.environ.get('MKL_DEBUG_CPU_TYPE')}")
