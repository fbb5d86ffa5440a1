"""bench/shipped.py: PaddleNLP's process runs as PaddleNLP ships (never importing glm), ours as glm sets it
up, the same weights and batch in both, and the script prints the figures."""

import os
import re
import subprocess
import sys

import glm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "shipped.py")


def test_each_side_runs_as_it_ships_on_the_same_weights():
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_DEBUG_CPU_TYPE")}
    result = subprocess.run(
        [sys.executable, SCRIPT, "--shape", "tiny", "--rounds", "1", "--steps", "1", "--new-tokens", "4"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    fast_mkl = glm.mkl_cpu_type(glm.read_cpuinfo())
    for task, names in (("step", ["step"]), ("greedy", ["greedy", "beam 5"])):
        for name in names:
            assert re.search(rf"ours +{name} +median +[\d.]+ tok/s .*threads={len(os.sched_getaffinity(0))} "
                             rf"MKL_DEBUG_CPU_TYPE={fast_mkl}", out), out
        assert re.search(rf"PaddleNLP {task} +median +[\d.]+ tok/s .*threads=1 MKL_DEBUG_CPU_TYPE=None",
                         out), out
    assert "ours vs PaddleNLP, first loss: identical" in out
    assert "ours vs PaddleNLP, greedy tokens: identical" in out
    assert "ours step / PaddleNLP step: median" in out and "ours beam 5 / ours greedy: median" in out
