"""How a torchrun run ends: every process with the same exit, and one clear line each when it stops early."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, learnable_corpus, run_script

TINY_DDP = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--eval_iters=2",
            "--log_interval=1", "--sample_tokens=0", "--device=cpu", "--dataset=tiny"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    (root / "corpus.txt").write_text(learnable_corpus())
    run_script("data/prepare.py", "tiny", f"--input={root / 'corpus.txt'}", "--tokenizer=char",
               f"--data_root={root / 'data'}")
    return root / "data"


def torchrun(log_dir, *args, timeout=180, **popen):
    """train.py under torchrun with 2 gloo processes; each process's stderr goes to a file of its own."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--redirects=3", f"--log-dir={log_dir}", "train.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if popen:
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, **popen)
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def process_stderr(log_dir):
    """{rank: the text that process wrote to stderr}."""
    paths = glob.glob(os.path.join(log_dir, "*", "attempt_0", "*", "stderr.log"))
    return {int(os.path.basename(os.path.dirname(p))): open(p).read() for p in paths}


def last_line(text):
    return text.strip().splitlines()[-1]


def test_a_finished_two_process_run_exits_0_on_every_process_every_time(data_root, tmp_path):
    # The end of a run raced with gloo's worker threads: a process that finished first could
    # abort at exit (SIGABRT) about once in 30 runs on a loaded machine. Several runs in a row,
    # each of which must end with exit 0 on both processes.
    for attempt in range(4):
        out_dir, log_dir = tmp_path / f"out{attempt}", tmp_path / f"logs{attempt}"
        result = torchrun(log_dir, *TINY_DDP, f"--data_root={data_root}", f"--out_dir={out_dir}",
                          "--max_iters=4", "--eval_interval=2")
        stderr = process_stderr(log_dir)
        assert result.returncode == 0, (attempt, result.stderr[-3000:], stderr)
        assert sorted(stderr) == [0, 1]
        assert "done: 4 steps" in stderr[0]
        for text in stderr.values():
            assert "Traceback" not in text and "terminate called" not in text, text[-2000:]
        assert torch.load(out_dir / "ckpt.pt", weights_only=True)["step"] == 4


def test_a_nan_stops_every_process_at_once_with_one_line(data_root, tmp_path):
    # an absurd learning rate with no clipping: the all-reduced loss is NaN/inf on every process at once
    out_dir, log_dir = tmp_path / "out", tmp_path / "logs"
    started = time.time()
    result = torchrun(log_dir, *TINY_DDP, f"--data_root={data_root}", f"--out_dir={out_dir}", "--max_iters=40",
                      "--eval_interval=1", "--learning_rate=1e12", "--min_lr=1e12", "--grad_clip=0",
                      "--optimizer=adamw")
    assert time.time() - started < 150  # not the collective timeout (30 minutes for gloo)
    assert result.returncode != 0
    stderr = process_stderr(log_dir)
    assert last_line(stderr[0]).startswith("error: loss became NaN/inf"), stderr[0][-2000:]
    # process 1 says the same, or (when the launcher stopped it first) that it follows process 0
    assert (last_line(stderr[1]).startswith("error: loss became NaN/inf")
            or last_line(stderr[1]).startswith("stopped: process 0 stopped (error: loss became NaN/inf")), stderr[1]
    for text in stderr.values():
        assert "Traceback" not in text, text[-2000:]
    assert not (out_dir / "ckpt.pt").exists()  # nothing diverged is saved


def test_an_error_in_one_process_stops_the_others_at_once_with_one_line(data_root, tmp_path):
    # only process 0 writes the checkpoint: a folder where it goes stops process 0 alone, at
    # step 4, while process 1 goes on into the next step's gradient all-reduce
    out_dir, log_dir = tmp_path / "out", tmp_path / "logs"
    (out_dir / "ckpt.pt").mkdir(parents=True)
    started = time.time()
    result = torchrun(log_dir, *TINY_DDP, f"--data_root={data_root}", f"--out_dir={out_dir}", "--max_iters=8",
                      "--eval_interval=4")
    assert time.time() - started < 150  # not the collective timeout (30 minutes for gloo)
    assert result.returncode != 0
    stderr = process_stderr(log_dir)
    error = f"error: cannot write the checkpoint {out_dir / 'ckpt.pt'}: Is a directory"
    assert last_line(stderr[0]) == error, stderr[0][-2000:]
    assert last_line(stderr[1]) == f"stopped: process 0 stopped ({error}), so process 1 stops too", stderr[1]
    for text in stderr.values():
        assert "Traceback" not in text, text[-2000:]
    # a single process says the same in the same one line
    single = run_script("train.py", *TINY_DDP, f"--data_root={data_root}", f"--out_dir={out_dir}",
                        "--max_iters=4", "--eval_interval=4", check=False)
    assert single.returncode == 2 and "Traceback" not in single.stderr
    assert last_line(single.stderr) == error


def test_ctrl_c_on_the_launcher_saves_once_and_every_process_stops_cleanly(data_root, tmp_path):
    # A terminal's Ctrl-C reaches torchrun, which forwards it to each process (every one runs in
    # a session of its own): they agree on a step, process 0 saves, and they leave together.
    out_dir, log_dir = tmp_path / "out", tmp_path / "logs"
    launcher = torchrun(log_dir, *TINY_DDP, f"--data_root={data_root}", f"--out_dir={out_dir}",
                        "--max_iters=100000", "--eval_interval=100000", start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training is under way
        log = out_dir / "log.jsonl"
        if log.exists() and '"loss"' in log.read_text():
            break
        time.sleep(0.2)
    os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    launcher.communicate(timeout=120)
    stderr = process_stderr(log_dir)
    assert "stopped at step" in stderr[0] and "--init_from=resume" in stderr[0], stderr[0][-2000:]
    for text in stderr.values():
        assert "Traceback" not in text and "interrupted" not in text, text[-2000:]
    stopped_at = torch.load(out_dir / "ckpt.pt", weights_only=True)["step"]
    assert 0 < stopped_at < 100000
