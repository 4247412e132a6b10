"""Files are written whole or not at all (model/files.py), and --help shows what would run."""

import os

import pytest
import torch

from conftest import run_script
from model.checkpoint import save_checkpoint
from model.files import atomic_write


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"the old checkpoint")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write(b"half of a new")
            raise RuntimeError("the disk is full")
    assert path.read_bytes() == b"the old checkpoint"
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_failing_checkpoint_save_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)
    old = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint({"step": 2, "not saveable": lambda: None}, path)  # torch.save cannot pickle a lambda
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_a_successful_write_replaces_the_file_and_creates_folders(tmp_path):
    path = tmp_path / "new" / "folder" / "notes.txt"
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write("whole")
    assert path.read_text() == "whole" and os.listdir(path.parent) == ["notes.txt"]


def test_help_shows_the_values_that_would_run():
    plain = run_script("train.py", "--help").stdout  # a plain run uses configs/default.toml
    assert "--max_iters=660 " in plain and "--eval_interval=330 " in plain and "--sample_prompt='def '" in plain
    preset = run_script("train.py", "configs/shakespeare_char_cpu.toml", "--help", "--max_iters=7").stdout
    assert "--out_dir='out-shakespeare-char-cpu'" in preset and "--max_iters=7 " in preset
