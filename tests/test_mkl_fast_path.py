"""Importing glm turns on MKL's AVX2 kernels on AMD CPUs (MKL_DEBUG_CPU_TYPE=5), only there, only when the
user has not chosen, and the answers and losses do not change with it."""

import json
import os
import subprocess
import sys

import pytest

import glm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpuinfo(vendor, flags, processors=2):
    block = "processor\t: {n}\nvendor_id\t: {vendor}\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n"
    return "".join(block.format(n=n, vendor=vendor, flags=flags) for n in range(processors))


AMD_AVX2 = cpuinfo("AuthenticAMD", "fpu sse sse2 avx fma avx2 bmi2")


@pytest.mark.parametrize(
    "text, expected",
    [
        (AMD_AVX2, "5"),
        (cpuinfo("AuthenticAMD", "fpu sse sse2 avx fma"), None),  # no AVX2: the AVX2 path would crash
        (cpuinfo("AuthenticAMD", "fpu sse sse2 avx avx2"), None),  # no FMA
        (AMD_AVX2.replace("fma avx2", "fma", 1), None),  # one processor without AVX2
        (cpuinfo("GenuineIntel", "fpu sse sse2 avx fma avx2"), None),  # Intel: MKL's fast path already
        (cpuinfo("HygonGenuine", "fpu sse sse2 avx fma avx2"), None),  # other vendors: left alone
        ("", None),  # no /proc/cpuinfo (another OS)
        ("processor : 0\nBogoMIPS : 100\nFeatures : fp asimd\n", None),  # an ARM machine's layout
        ("garbage without fields", None),
    ],
    ids=["amd-avx2-fma", "amd-no-avx2", "amd-no-fma", "amd-mixed", "intel", "other-vendor", "empty", "arm",
         "garbage"],
)
def test_the_cpu_type_is_chosen_from_the_cpu_description(text, expected):
    assert glm.mkl_cpu_type(text) == expected


def test_a_user_setting_is_kept_and_nothing_is_set_off_amd():
    chosen = {"MKL_DEBUG_CPU_TYPE": ""}
    glm.use_fast_mkl_kernels(chosen, cpuinfo=AMD_AVX2)
    assert chosen == {"MKL_DEBUG_CPU_TYPE": ""}
    unset = {}
    glm.use_fast_mkl_kernels(unset, cpuinfo=AMD_AVX2)
    assert unset == {"MKL_DEBUG_CPU_TYPE": "5"}
    intel = {}
    glm.use_fast_mkl_kernels(intel, cpuinfo=cpuinfo("GenuineIntel", "avx2 fma"))
    assert intel == {}


def test_a_missing_cpu_description_reads_as_empty(tmp_path):
    assert glm.read_cpuinfo(str(tmp_path / "no-such-file")) == ""
    assert glm.read_cpuinfo(str(tmp_path)) == ""  # a directory: unreadable as a file


def run_children(code, settings, *args):
    """stdout of `python -c code` run once per MKL_DEBUG_CPU_TYPE setting (None: unset), all at once."""
    runs = []
    for setting in settings:
        env = {key: value for key, value in os.environ.items() if key != "MKL_DEBUG_CPU_TYPE"}
        if setting is not None:
            env["MKL_DEBUG_CPU_TYPE"] = setting
        runs.append(subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True))
    outputs = []
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-2000:]
        outputs.append(stdout.strip().splitlines()[-1])
    return outputs


# Greedy and beam answers and two training steps' losses of a model big enough for MKL's vendor-specific
# kernels to run (hidden 256: blocked GEMMs, not the small-matrix path).
OUTPUTS = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/tests")
import glm, numpy as np, paddle
from conftest import tiny_config_kwargs
from glm.generation import GenerationConfig, GLMGenerator
from glm.tokenization import GLMSpecialIds

ids = GLMSpecialIds(cls=1002, eos=1001, sop=1006, eop=1007, mask=1003, smask=1008, gmask=1009)
paddle.seed(0)
model = glm.GLMForConditionalGeneration(glm.GLMConfig(**tiny_config_kwargs(
    vocab_size=1010, hidden_size=256, num_attention_heads=4, max_sequence_length=128, initializer_range=0.1)))
model.eval()
rng = np.random.default_rng(0)
sources = [[ids.cls] + rng.integers(0, 1000, n).tolist() + [ids.gmask, ids.eos] for n in (20, 35, 50)]
generator = GLMGenerator(model, ids, banned_ids=[ids.eop, ids.eos])
greedy = generator.generate(sources, GenerationConfig(decode_strategy="greedy_search", tgt_length=24))
beam = generator.generate(sources, GenerationConfig(num_beams=4, tgt_length=24, length_penalty=0.7,
                                                    no_repeat_ngram_size=3))
model.train()
optimizer = paddle.optimizer.AdamW(1e-3, parameters=model.parameters())
input_ids = paddle.to_tensor(rng.integers(0, 1000, (4, 64)))
position_ids = paddle.to_tensor(np.stack([np.arange(64), np.zeros(64, dtype="int64")])[None].repeat(4, 0))
losses = []
for _ in range(2):
    loss = model(input_ids, position_ids, paddle.to_tensor([32] * 4), labels=input_ids, return_dict=True).loss
    loss.backward()
    optimizer.step()
    optimizer.clear_grad()
    losses.append(float(loss))
print(json.dumps({"mkl": os.environ.get("MKL_DEBUG_CPU_TYPE"), "greedy": greedy, "beam": beam, "losses": losses}))
"""


@pytest.fixture(scope="module")
def fast_and_default():
    # Unset: glm picks the AVX2 kernels on an AMD CPU; "": the user's choice, MKL's default kernels (their
    # logits differ in the last bits), which is also what a BLAS ignoring the variable computes. Elsewhere
    # both runs take the same kernels and the outputs agree trivially.
    return [json.loads(output) for output in run_children(OUTPUTS, (None, ""), ROOT)]


def test_importing_glm_sets_the_variable_only_where_the_cpu_takes_it(fast_and_default):
    fast, default = fast_and_default
    assert fast["mkl"] == glm.mkl_cpu_type(glm.read_cpuinfo())
    assert default["mkl"] == ""


def test_answers_and_losses_are_the_same_with_and_without_the_fast_path(fast_and_default):
    fast, default = fast_and_default
    assert fast["greedy"] == default["greedy"]
    assert fast["beam"] == default["beam"]
    assert len({tuple(answer[0][0]) for answer in fast["beam"]}) == 3  # the sources got different answers
    assert fast["losses"] == pytest.approx(default["losses"], rel=1e-5)
    assert fast["losses"][1] != fast["losses"][0]  # the step trained
