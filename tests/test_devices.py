"""The GPU code paths (mixed precision, gradient scaling, torch.compile), exercised on the CPU."""

import torch

from conftest import TINY_MODEL, run_script
from test_train import read_log


def test_bfloat16_autocast_trains(tiny_char_data, tmp_path):
    run_script("train.py", *TINY_MODEL, "--dtype=bfloat16", f"--data_root={tiny_char_data}", "--dataset=tiny",
               f"--out_dir={tmp_path / 'out'}", "--max_iters=30", "--eval_interval=30", "--learning_rate=3e-3")
    evaluations = [r for r in read_log(tmp_path / "out") if "val_loss" in r]
    assert evaluations[-1]["val_loss"] < evaluations[0]["val_loss"] - 0.2
    weights = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["model"]
    assert all(w.dtype == torch.float32 for w in weights.values())  # autocast keeps fp32 master weights


def test_float16_uses_a_gradient_scaler_and_trains(tiny_char_data, tmp_path):
    result = run_script("train.py", *TINY_MODEL, "--dtype=float16", f"--data_root={tiny_char_data}",
                        "--dataset=tiny", f"--out_dir={tmp_path / 'out'}", "--max_iters=30", "--eval_interval=30",
                        "--learning_rate=3e-3")
    assert "float16" in result.stderr
    checkpoint = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert checkpoint["scaler"]["scale"] > 0  # the scaler was active and its state is saved
    evaluations = [r for r in read_log(tmp_path / "out") if "val_loss" in r]
    assert evaluations[-1]["val_loss"] < evaluations[0]["val_loss"] - 0.2


def test_compiled_training_saves_checkpoints_that_load_without_compile(tiny_char_data, tmp_path):
    run_script("train.py", *TINY_MODEL, "--compile=true", f"--data_root={tiny_char_data}", "--dataset=tiny",
               f"--out_dir={tmp_path / 'out'}", "--max_iters=10", "--eval_interval=10")
    weights = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["model"]
    assert not any(name.startswith("_orig_mod") for name in weights)
    result = run_script("sample.py", f"--out_dir={tmp_path / 'out'}", "--max_new_tokens=20", "--device=cpu")
    assert len(result.stdout) > 10
