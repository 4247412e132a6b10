"""Helpers shared by the tests: run a script the way a user does, and make small corpora."""

import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

# Tests run in parallel (pytest -n auto): one thread per test process keeps them from
# fighting over the cores (see run_script).
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A machine without a C compiler generates in PyTorch alone (test_quant and test_kernels test that
# too); the tests of model/kernels.c need one to build it (CI has one, so there they always run)
needs_a_c_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None,
                                        reason="no C compiler (cc): generation runs in PyTorch alone")


def run_script(*args, timeout=300, env=None, check=True, input=None):
    """python <script> <args> from the repository root, as a user would type it (`input`: its stdin)."""
    # One thread per process: the tiny models here gain nothing from more, and threads that
    # spin while another process holds the other core slow a run down many times over.
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env=full_env, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return result


def assert_clean_error(result):
    """Bad input: exit code 2 and exactly one line on stderr, `error: ...`, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def learnable_corpus(n_chars=60_000, seed=0):
    """Text with a low conditional entropy but a high unigram entropy: a few words, each
    spelled the same way every time, in a random order. Knowing the context predicts the next
    character; knowing only character frequencies does not."""
    rng = random.Random(seed)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    out, size = [], 0
    while size < n_chars:
        word = rng.choice(words)
        out.append(word)
        size += len(word) + 1
    lines = [" ".join(out[i:i + 8]) for i in range(0, len(out), 8)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def tiny_char_data(tmp_path):
    """A prepared char-level data set in tmp_path/data/tiny; returns the data root."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(learnable_corpus())
    data_root = tmp_path / "data"
    run_script("data/prepare.py", "tiny", f"--input={corpus}", "--tokenizer=char", f"--data_root={data_root}")
    return data_root


TINY_MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
              "--eval_iters=2", "--log_interval=1", "--sample_tokens=0", "--device=cpu"]
