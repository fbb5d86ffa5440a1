"""bench/decode.py: our greedy decoding equals PaddleNLP's `generate` on the same weights, and the script runs."""

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "decode.py")

_spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT)
decode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decode)


def test_greedy_equals_paddlenlp_generate_on_a_padded_batch():
    # A large init: at the default 0.02 a random GLM repeats one token and cannot tell positions apart.
    _, ids, ours, theirs = decode.build("tiny", initializer_range=0.3)
    sources = decode.make_sources(ids, 4, 20, 40)  # different lengths: ours left-pads, PaddleNLP right-pads
    runs = decode.runners(ours, theirs, ids, sources, 16)
    ours_tokens, their_tokens = runs["ours greedy"](), runs["PaddleNLP greedy"]()
    assert all(len(tokens) == 16 and len(set(tokens)) > 4 for tokens in ours_tokens)
    assert ours_tokens == their_tokens


def test_script_prints_figures_agreement_the_split_and_the_paddlenlp_beam_crash():
    result = subprocess.run(
        [sys.executable, SCRIPT, "--only", "tiny", "--new-tokens", "4", "--prompts", "2", "--shortest", "10",
         "--longest", "20"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "greedy tokens, ours vs PaddleNLP: 2/2 prompts identical" in result.stdout
    assert "PaddleNLP beam search: crashed" in result.stdout
    assert "tok/s" in result.stdout
    for kind in decode.SPLIT:
        assert f"    {kind}" in result.stdout
    assert "x the read floor" in result.stdout
