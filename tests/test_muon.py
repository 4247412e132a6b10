"""Muon (model/muon.py): orthogonalised momentum for the blocks' matrices, AdamW for the rest."""

import os
import subprocess
import sys

import torch

from conftest import REPO, TINY_MODEL, run_script
from model.gpt import GPT, GPTConfig
from model.muon import Muon, orthogonalize


def test_newton_schulz_makes_every_singular_value_close_to_one():
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 64), (48, 48)]:
        # singular values from 0.1 to 10, spread evenly on a log scale (five iterations lift
        # values down to about 1/100 of the largest into the band; smaller ones need more)
        u, _, v = torch.linalg.svd(torch.randn(*shape), full_matrices=False)
        singular = torch.logspace(-1, 1, min(shape))
        update = orthogonalize(u @ torch.diag(singular) @ v)
        values = torch.linalg.svdvals(update)
        # the quintic iteration trades exactness for speed: singular values land in about [0.7, 1.2]
        assert values.min() > 0.6 and values.max() < 1.25, (shape, values.min(), values.max())
        # and the directions are the input's: U V^T up to that tolerance
        assert torch.allclose(update, u @ v, atol=0.15)


def test_a_muon_step_lowers_the_loss_of_a_tiny_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=32))
    matrices = [p for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2]
    rest = [p for p in model.parameters() if not any(p is q for q in matrices)]
    optimizer = Muon([{"params": matrices, "use_muon": True, "lr": 0.02}, {"params": rest, "lr": 1e-3}])
    x = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(10):
        _, loss = model(x, x)  # learn to copy: any working optimizer lowers this fast
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.3, losses


def test_training_with_muon_resumes_bit_for_bit(tiny_char_data, tmp_path):
    common = [*TINY_MODEL, f"--data_root={tiny_char_data}", "--dataset=tiny", "--optimizer=muon",
              "--eval_interval=1000", "--lr_decay_iters=20", "--warmup_iters=5"]
    run_script("train.py", *common, "--max_iters=20", f"--out_dir={tmp_path / 'straight'}")
    run_script("train.py", *common, "--max_iters=10", f"--out_dir={tmp_path / 'halves'}")
    run_script("train.py", "--init_from=resume", "--max_iters=20", f"--out_dir={tmp_path / 'halves'}")
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    halves = torch.load(tmp_path / "halves" / "ckpt.pt", weights_only=True)
    assert straight["step"] == halves["step"] == 20
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, halves["model"][name]), name
    # the optimizer's state was saved and restored: Muon's momentum buffers among it
    assert any("momentum_buffer" in s for s in halves["optimizer"]["state"].values())


def test_muon_under_ddp_matches_one_process(tiny_char_data, tmp_path):
    common = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--eval_iters=2", "--optimizer=muon",
              "--log_interval=1", "--sample_tokens=0", "--device=cpu", f"--data_root={tiny_char_data}",
              "--dataset=tiny", "--max_iters=6", "--eval_interval=3"]
    run_script("train.py", *common, "--batch_size=4", f"--out_dir={tmp_path / 'single'}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    result = subprocess.run([*torchrun, *common, "--batch_size=2", f"--out_dir={tmp_path / 'ddp'}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    single = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=True)["model"]
    ddp = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]
    for name, tensor in single.items():
        assert torch.allclose(tensor, ddp[name], atol=1e-4), name


def test_an_unknown_optimizer_is_refused_clearly(tiny_char_data, tmp_path):
    from conftest import assert_clean_error

    assert_clean_error(run_script("train.py", *TINY_MODEL, f"--data_root={tiny_char_data}", "--dataset=tiny",
                                  "--optimizer=sgd", f"--out_dir={tmp_path}", check=False))
    assert not os.path.exists(tmp_path / "ckpt.pt")
