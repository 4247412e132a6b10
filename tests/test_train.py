import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import REPO, TINY_MODEL, assert_clean_error, run_script


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_weights(out_dir):
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)["model"]


def test_help_lists_every_field():
    result = run_script("train.py", "--help")
    for name in ["--init_from", "--out_dir", "--dataset", "--device", "--dtype", "--compile", "--seed",
                 "--max_iters", "--eval_interval", "--eval_iters", "--batch_size", "--block_size",
                 "--n_layer", "--n_head", "--n_embd", "--arch", "--learning_rate"]:
        assert name in result.stdout


def test_a_tiny_run_learns_far_below_the_unigram_entropy(tiny_char_data, tmp_path):
    out_dir = tmp_path / "out"
    result = run_script("train.py", *TINY_MODEL, f"--data_root={tiny_char_data}", "--dataset=tiny",
                        f"--out_dir={out_dir}", "--max_iters=150", "--eval_interval=50", "--learning_rate=3e-3",
                        "--sample_tokens=40", "--sample_prompt=alpha ")
    assert "unigram entropy of the data" in result.stderr and "parameters" in result.stderr
    entropy = float(result.stderr.split("unigram entropy of the data = ")[1].split()[0])
    evaluations = [r for r in read_log(out_dir) if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 50, 100, 150]
    assert evaluations[-1]["val_loss"] < 0.5 * entropy, (evaluations[-1], entropy)
    assert evaluations[-1]["val_bpb"] > 0
    assert any("tokens_per_s" in r for r in read_log(out_dir))
    assert result.stdout.startswith("alpha ")  # the end-of-run sample continues its prompt
    assert os.path.exists(out_dir / "ckpt.pt")


def test_resume_after_ctrl_c_continues_bit_for_bit(tiny_char_data, tmp_path):
    # dropout on: the resumed run must also continue the random number streams exactly
    common = [*TINY_MODEL, f"--data_root={tiny_char_data}", "--dataset=tiny", "--eval_interval=1000",
              "--max_iters=400", "--dropout=0.1"]
    interrupted = tmp_path / "interrupted"
    # the same thread count as run_script's runs: bit-for-bit needs the same float summation order
    process = subprocess.Popen([sys.executable, "train.py", *common, f"--out_dir={interrupted}"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training is under way
        log = interrupted / "log.jsonl"
        if log.exists() and any('"loss"' in line for line in log.read_text().splitlines()):
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "--init_from=resume" in stderr
    stopped_at = torch.load(interrupted / "ckpt.pt", weights_only=True)["step"]
    assert 0 < stopped_at < 400
    run_script("train.py", "--init_from=resume", f"--out_dir={interrupted}")
    run_script("train.py", *common, f"--out_dir={tmp_path / 'straight'}")
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(interrupted)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    losses = lambda out: [(r["step"], r["loss"]) for r in read_log(out) if "loss" in r]
    assert losses(tmp_path / "straight") == losses(interrupted)


def test_fine_tuning_starts_a_new_run_from_trained_weights(tiny_char_data, tmp_path):
    base = tmp_path / "base"
    run_script("train.py", *TINY_MODEL, f"--data_root={tiny_char_data}", "--dataset=tiny",
               f"--out_dir={base}", "--max_iters=30", "--eval_interval=30")
    tuned = tmp_path / "tuned"
    run_script("train.py", f"--init_from={base / 'ckpt.pt'}", *TINY_MODEL, f"--data_root={tiny_char_data}",
               "--dataset=tiny", f"--out_dir={tuned}", "--max_iters=5", "--eval_interval=5", "--learning_rate=1e-4")
    first_eval = [r for r in read_log(tuned) if "val_loss" in r][0]
    base_final = [r for r in read_log(base) if "val_loss" in r][-1]
    assert first_eval["step"] == 0
    assert abs(first_eval["val_loss"] - base_final["val_loss"]) < 1e-4  # same weights, same eval batches


def test_llama_arch_trains(tiny_char_data, tmp_path):
    run_script("train.py", *TINY_MODEL, "--arch=llama", f"--data_root={tiny_char_data}", "--dataset=tiny",
               f"--out_dir={tmp_path / 'out'}", "--max_iters=20", "--eval_interval=20")
    evaluations = [r for r in read_log(tmp_path / "out") if "val_loss" in r]
    assert evaluations[-1]["val_loss"] < evaluations[0]["val_loss"]


def test_bad_options_are_refused_clearly(tiny_char_data, tmp_path):
    assert_clean_error(run_script("train.py", "--no_such_field=1", check=False))
    assert_clean_error(run_script("train.py", "--n_layer=four", check=False))
    assert_clean_error(run_script("train.py", "--n_layer=0", check=False))
    assert_clean_error(run_script("train.py", "configs/no_such_preset.toml", check=False))
    assert_clean_error(run_script("train.py", f"--data_root={tiny_char_data}", "--dataset=never_prepared", check=False))
    assert_clean_error(run_script("train.py", "--init_from=resume", f"--out_dir={tmp_path / 'empty'}", check=False))
    bad_preset = tmp_path / "bad.toml"
    bad_preset.write_text('n_layer = "many"\n')
    assert_clean_error(run_script("train.py", str(bad_preset), check=False))


def test_a_corrupt_checkpoint_is_refused_and_kept(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    assert_clean_error(run_script("train.py", "--init_from=resume", f"--out_dir={out_dir}", check=False))
    assert (out_dir / "ckpt.pt").read_bytes() == b"not a checkpoint at all"


def test_a_diverging_run_stops_clearly_and_keeps_the_last_good_checkpoint(tiny_char_data, tmp_path):
    out_dir = tmp_path / "out"
    common = [*TINY_MODEL, f"--data_root={tiny_char_data}", "--dataset=tiny", f"--out_dir={out_dir}"]
    # AdamW: its learning rate is every weight's (Muon's matrices would keep their own rate)
    run_script("train.py", *common, "--optimizer=adamw", "--max_iters=5", "--eval_interval=5")
    good = (out_dir / "ckpt.pt").read_bytes()
    # an absurd learning rate with no clipping blows the weights up within a few steps
    result = run_script("train.py", "--init_from=resume", f"--out_dir={out_dir}", "--max_iters=60",
                        "--learning_rate=1e12", "--min_lr=1e12", "--grad_clip=0", "--eval_interval=1",
                        check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]  # after the run's own progress output
    assert last_line.startswith("error: loss became NaN/inf") or last_line.startswith("error: loss is"), last_line
    assert (out_dir / "ckpt.pt").read_bytes() == good


def test_ddp_with_two_processes_matches_one_process_at_the_same_global_batch(tiny_char_data, tmp_path):
    common = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--eval_iters=2",
              "--log_interval=1", "--sample_tokens=0", "--device=cpu", f"--data_root={tiny_char_data}",
              "--dataset=tiny", "--max_iters=8", "--eval_interval=4"]
    run_script("train.py", *common, "--batch_size=4", "--grad_accum=2", f"--out_dir={tmp_path / 'single'}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    # 2 processes x 2 micro-batches of 2 rows: the same 8 rows per step as the single process
    # (and the same 4 rows per evaluation batch); gradients are all-reduced once per step
    result = subprocess.run([*torchrun, *common, "--batch_size=2", "--grad_accum=2", f"--out_dir={tmp_path / 'ddp'}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    single, ddp = read_log(tmp_path / "single"), read_log(tmp_path / "ddp")
    assert [r["step"] for r in single] == [r["step"] for r in ddp]
    for a, b in zip(single, ddp):
        for key in ("loss", "train_loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-4, (key, a, b)
