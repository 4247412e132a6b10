"""LoRA: a frozen base, small adapters trained and saved alone, merged for use."""

import copy
import hashlib
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_MODEL, assert_clean_error, learnable_corpus, run_script
from model import lora
from model.checkpoint import (load_checkpoint, lora_base_from_checkpoint, lora_model_from_checkpoint,
                              model_from_checkpoint, save_checkpoint)
from model.gpt import GPT, GPTConfig

# a base a little wider than the other tests' so that the adapter is a small part of it
BASE_MODEL = [a for a in TINY_MODEL if not a.startswith("--n_embd")] + ["--n_embd=64", "--plot=false"]
LORA_STEPS = 40


def file_sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def tuning_corpus(n_lines=1500):
    """The fine-tuning text: the base's words (so the same characters), always in one order."""
    words = learnable_corpus(2000).split()
    order = list(dict.fromkeys(words))
    return "".join(" ".join(order[i % len(order):] + order[:i % len(order)]) + "\n" for i in range(n_lines))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base trained here (gpt2 and llama) on words in a random order, and a LoRA run on each
    that fine-tunes it to one fixed order (the llama one on every linear layer of the blocks)."""
    root = tmp_path_factory.mktemp("lora")
    data = root / "data"
    for name, text in (("tiny", learnable_corpus()), ("tuning", tuning_corpus())):
        (root / f"{name}.txt").write_text(text)
        run_script("data/prepare.py", name, f"--input={root / name}.txt", "--tokenizer=char", f"--data_root={data}")
    common = [*BASE_MODEL, f"--data_root={data}", "--dataset=tiny"]
    tuning = [*BASE_MODEL, f"--data_root={data}", "--dataset=tuning"]
    paths = SimpleNamespace(root=root, data=data, common=common, tuning=tuning)
    for arch, targets in (("gpt2", "q,v"), ("llama", "all")):
        base = root / f"base-{arch}"
        run_script("train.py", *common, f"--arch={arch}", f"--out_dir={base}", "--max_iters=60", "--eval_interval=60")
        base_sha256 = file_sha256(base / "ckpt.pt")
        adapted = root / f"lora-{arch}"
        result = run_script("train.py", f"--init_from={base / 'ckpt.pt'}", *tuning, f"--out_dir={adapted}",
                            f"--max_iters={LORA_STEPS}", "--eval_interval=20", "--lora_rank=4",
                            f"--lora_targets={targets}", "--learning_rate=2e-2", "--warmup_iters=5")
        setattr(paths, f"base_{arch}", base)
        setattr(paths, f"base_sha256_{arch}", base_sha256)
        setattr(paths, f"lora_{arch}", adapted)
        setattr(paths, f"stderr_{arch}", result.stderr)
    return paths


def random_adapters(model, seed=0):
    """Give every B random values (a trained adapter's stand-in: at B = 0 it changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def tiny_model(arch, **overrides):
    torch.manual_seed(0)
    config = dict(arch=arch, vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return GPT(GPTConfig(**{**config, **overrides})).eval()


# ---- the module -------------------------------------------------------------------------------

def test_gpt2_124m_trains_0_24_percent_of_its_numbers_with_r8_on_q_and_v():
    with torch.device("meta"):  # the shapes alone: no memory, no time
        model = GPT(GPTConfig())
        lora.add_lora(model, rank=8, alpha=16, dropout=0.0, targets=lora.parse_targets("q,v", "gpt2"))
    assert lora.trainable_summary(model, 8, ["q", "v"]) == "LoRA r=8 on q,v: 294,912 trainable of 124,734,720 (0.24%)"


def test_targets_use_the_models_own_names():
    assert lora.parse_targets("v,q", "gpt2") == ["q", "v"]
    assert lora.parse_targets("all", "gpt2") == ["q", "k", "v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert "mlp.c_gate" in lora.parse_targets("all", "llama")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_step_zero_is_exactly_the_base(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    base_logits, _ = model(ids)
    lora.add_lora(model, rank=4, alpha=8, dropout=0.0, targets=lora.parse_targets("all", arch))
    adapted_logits, _ = model(ids)
    assert torch.equal(base_logits, adapted_logits)  # B = 0 adds exactly nothing


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_and_unmerged_logits_agree(arch):
    model = tiny_model(arch, n_kv_head=2) if arch == "llama" else tiny_model(arch)  # llama: grouped-query attention
    base = copy.deepcopy(model)
    lora.add_lora(model, rank=4, alpha=8, dropout=0.0, targets=lora.parse_targets("all", arch))
    random_adapters(model)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged, _ = model(ids)
        lora.merge(model)
        merged, _ = model(ids)
        lora.unmerge(model)
        unmerged_again, _ = model(ids)
    assert (merged - unmerged).abs().max() < 1e-5
    assert (unmerged_again - unmerged).abs().max() < 1e-5
    with torch.no_grad():
        assert (merged - base(ids)[0]).abs().max() > 1e-3  # the adapter does something
        plain = lora.merge_and_remove(model)
        assert not lora.lora_layers(plain) and set(plain.state_dict()) == set(base.state_dict())
        assert (plain(ids)[0] - unmerged).abs().max() < 1e-5


def test_the_optimizer_receives_only_the_adapter():
    from model.optimizer import make_optimizer

    model = tiny_model("gpt2")
    lora.add_lora(model, rank=4, alpha=8, dropout=0.0, targets=["q", "v"])
    optimizer = make_optimizer(model, "cpu")
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    adapters = {id(p) for name, p in model.named_parameters() if ".lora_" in name}
    assert in_optimizer == adapters and len(adapters) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(not p.requires_grad for name, p in model.named_parameters() if ".lora_" not in name)


# ---- training ---------------------------------------------------------------------------------

def test_a_lora_run_prints_what_it_trains_and_its_adapter_size(runs):
    assert "LoRA r=4 on q,v: 2,048 trainable of" in runs.stderr_gpt2
    assert "adapter checkpoint" in runs.stderr_gpt2 and "of the base's checkpoint" in runs.stderr_gpt2


def test_the_loss_on_the_fine_tuning_data_falls(runs):
    for arch in ("gpt2", "llama"):
        evaluations = [r for r in read_log(getattr(runs, f"lora_{arch}")) if "val_loss" in r]
        assert evaluations[-1]["val_loss"] < evaluations[0]["val_loss"] - 0.05, (arch, evaluations)


def test_a_lora_run_starts_exactly_at_the_base(runs, tmp_path):
    run_script("train.py", f"--init_from={runs.base_gpt2 / 'ckpt.pt'}", *runs.common, f"--out_dir={tmp_path}",
               "--max_iters=0", "--lora_rank=4")
    base_final = [r for r in read_log(runs.base_gpt2) if "val_loss" in r][-1]
    assert abs(read_log(tmp_path)[0]["val_loss"] - base_final["val_loss"]) < 1e-6


def test_the_base_file_is_never_written_and_the_checkpoint_holds_only_the_adapter(runs):
    for arch in ("gpt2", "llama"):
        assert file_sha256(getattr(runs, f"base_{arch}") / "ckpt.pt") == getattr(runs, f"base_sha256_{arch}")
    checkpoint = load_checkpoint(runs.lora_gpt2)
    assert set(checkpoint["model"]) == {f"blocks.{i}.attn.c_attn.lora_{m}.{s}" for i in range(2) for m in "AB"
                                        for s in "qv"}
    assert len(checkpoint["optimizer"]["state"]) == len(checkpoint["model"])  # Adam moments for adapters only
    assert checkpoint["lora"]["base"] == str(runs.base_gpt2 / "ckpt.pt")
    assert len(checkpoint["lora"]["base_sha256"]) == 64


def test_the_adapter_checkpoint_is_a_small_fraction_of_the_base(runs):
    adapter = os.path.getsize(runs.lora_gpt2 / "ckpt.pt")
    base = os.path.getsize(runs.base_gpt2 / "ckpt.pt")
    assert adapter < 0.05 * base, (adapter, base)


def test_lora_resume_continues_bit_for_bit(runs, tmp_path):
    # dropout in the base and on the adapters: the resumed run must continue the random streams too
    common = [*runs.tuning, f"--init_from={runs.base_gpt2 / 'ckpt.pt'}", "--lora_rank=4", "--lora_dropout=0.1",
              "--dropout=0.1", "--eval_interval=1000", "--lr_decay_iters=12", "--learning_rate=1e-2"]
    run_script("train.py", *common, "--max_iters=12", f"--out_dir={tmp_path / 'straight'}")
    run_script("train.py", *common, "--max_iters=5", f"--out_dir={tmp_path / 'split'}")
    run_script("train.py", "--init_from=resume", "--max_iters=12", f"--out_dir={tmp_path / 'split'}")
    straight, split = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    assert split["step"] == 12 and set(straight["model"]) == set(split["model"])
    for name in straight["model"]:
        assert torch.equal(straight["model"][name], split["model"][name]), name
    losses = lambda out: [(r["step"], r["loss"]) for r in read_log(out) if "loss" in r]
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")


# ---- using the adapted model ------------------------------------------------------------------

def test_sample_and_run_py_use_the_merged_model(runs):
    checkpoint = load_checkpoint(runs.lora_gpt2)
    adapted, tokenizer = lora_model_from_checkpoint(checkpoint)  # unmerged
    merged, _ = model_from_checkpoint(checkpoint)
    ids = torch.tensor([tokenizer.encode("alpha bravo charlie")])
    with torch.no_grad():
        assert (adapted.eval()(ids)[0] - merged.eval()(ids)[0]).abs().max() < 1e-5
    prompt = ["--prompt=alpha ", "--temperature=0", "--max_new_tokens=30"]
    sampled = run_script("sample.py", f"--out_dir={runs.lora_gpt2}", *prompt, "--device=cpu").stdout
    run_script("export.py", f"--out_dir={runs.lora_gpt2}", f"--output={runs.root / 'lora.bin'}")
    from_numpy = run_script("run.py", str(runs.root / "lora.bin"), *prompt).stdout
    assert sampled == from_numpy
    greedy = list(merged.generate(tokenizer.encode("alpha "), 30, temperature=0))
    assert sampled.strip() == ("alpha " + tokenizer.decode(greedy)).strip()


def explain_json(*args):
    return json.loads(run_script("explain.py", *args, "--device=cpu", "--json", "--top=3").stdout)


def test_explain_compare_base_shows_both_models_side_by_side(runs):
    prompt = "--prompt=alpha bravo"
    doc = explain_json(f"--out_dir={runs.lora_gpt2}", prompt, "--compare_base")
    base = explain_json(f"--out_dir={runs.base_gpt2}", prompt)
    comparison = doc["compare_base"]
    assert comparison["base"] == str(runs.base_gpt2 / "ckpt.pt")
    for entry, base_entry, adapted_entry in zip(comparison["positions"], base["positions"], doc["positions"]):
        assert [c["id"] for c in entry["base"]["top"]] == [c["id"] for c in base_entry["top"]]
        assert [c["id"] for c in entry["adapted"]["top"]] == [c["id"] for c in adapted_entry["top"]]
        if entry["next"]:
            assert abs(entry["base"]["next_prob"] - base_entry["next"]["prob"]) < 1e-5
            assert abs(entry["adapted"]["next_prob"] - adapted_entry["next"]["prob"]) < 1e-5
    assert abs(comparison["summary"]["adapted_mean_loss"] - doc["summary"]["mean_loss"]) < 1e-5
    table = run_script("explain.py", f"--out_dir={runs.lora_gpt2}", prompt, "--compare_base", "--device=cpu").stdout
    assert "the base" in table and "adapted" in table


# ---- peft, the outside reference --------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_peft_export_gives_the_same_logits_in_transformers_and_peft(runs, arch):
    """The adapter alone, loaded by peft onto the base's --format=hf export: the outside reference."""
    peft = pytest.importorskip("peft")
    import transformers

    out_dir, base_dir = getattr(runs, f"lora_{arch}"), getattr(runs, f"base_{arch}")
    adapter_dir, base_hf = runs.root / f"peft-{arch}", runs.root / f"hf-{arch}"
    run_script("export.py", f"--out_dir={out_dir}", "--format=peft", f"--output={adapter_dir}")
    run_script("export.py", f"--out_dir={base_dir}", "--format=hf", f"--output={base_hf}")
    assert sorted(os.listdir(adapter_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    checkpoint = load_checkpoint(out_dir)
    merged, tokenizer = model_from_checkpoint(checkpoint)
    base, _ = lora_base_from_checkpoint(checkpoint)
    ids = torch.tensor([tokenizer.encode("alpha bravo charlie delta echo")])
    with torch.no_grad():
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_hf).eval()
        reference = peft.PeftModel.from_pretrained(hf_base, str(adapter_dir)).eval()(ids).logits
        ours = merged.eval()(ids)[0]
        assert (reference - ours).abs().max() < 1e-4
        assert (ours - base.eval()(ids)[0]).abs().max() > 1e-3  # the adapter changed something


# ---- bad input --------------------------------------------------------------------------------

def test_bad_lora_options_are_refused_clearly_and_write_nothing(runs, tmp_path):
    base = f"--init_from={runs.base_gpt2 / 'ckpt.pt'}"
    out_dir = tmp_path / "never"
    for bad in (["--lora_rank=-1", base], ["--lora_rank=4", base, "--lora_targets=q,query"],
                ["--lora_rank=4", base, "--lora_targets=mlp.c_gate"],  # gpt2 has no gate
                ["--lora_rank=4", "--init_from=scratch"], ["--lora_rank=4"]):
        assert_clean_error(run_script("train.py", *runs.common, f"--out_dir={out_dir}", *bad, check=False))
        assert not out_dir.exists()


def test_lora_flags_on_a_resume_of_a_full_run_are_refused(runs, tmp_path):
    full = tmp_path / "full"
    shutil.copytree(runs.base_gpt2, full)
    before = file_sha256(full / "ckpt.pt")
    result = run_script("train.py", "--init_from=resume", f"--out_dir={full}", "--lora_rank=4", check=False)
    assert_clean_error(result)
    assert "not a LoRA run" in result.stderr and file_sha256(full / "ckpt.pt") == before


def test_a_missing_or_changed_base_is_refused_naming_it(runs, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(runs.base_gpt2, base)
    adapted = tmp_path / "adapted"
    run_script("train.py", f"--init_from={base / 'ckpt.pt'}", *runs.tuning, f"--out_dir={adapted}",
               "--max_iters=2", "--eval_interval=2", "--lora_rank=2")
    adapter_bytes = (adapted / "ckpt.pt").read_bytes()
    uses = [("sample.py", f"--out_dir={adapted}", "--max_new_tokens=3", "--device=cpu"),
            ("explain.py", f"--out_dir={adapted}", "--prompt=alpha", "--device=cpu"),
            ("export.py", f"--out_dir={adapted}", f"--output={tmp_path / 'model.bin'}"),
            ("train.py", "--init_from=resume", f"--out_dir={adapted}", "--max_iters=4")]

    def refused_everywhere(reason):
        for args in uses:
            result = run_script(*args, check=False)
            assert_clean_error(result)
            assert str(base / "ckpt.pt") in result.stderr and reason in result.stderr, result.stderr
        assert (adapted / "ckpt.pt").read_bytes() == adapter_bytes
        assert not (tmp_path / "model.bin").exists()

    # changed: the same file name, other weights
    checkpoint = torch.load(base / "ckpt.pt", weights_only=True)
    checkpoint["model"]["ln_f.weight"] += 0.01
    save_checkpoint(checkpoint, base / "ckpt.pt")
    refused_everywhere("has changed")
    # missing
    (base / "ckpt.pt").unlink()
    refused_everywhere("cannot load")


def test_peft_export_and_compare_base_need_a_lora_run(runs, tmp_path):
    assert_clean_error(run_script("export.py", f"--out_dir={runs.base_gpt2}", "--format=peft",
                                  f"--output={tmp_path / 'adapter'}", check=False))
    assert not (tmp_path / "adapter").exists()
    assert_clean_error(run_script("explain.py", f"--out_dir={runs.base_gpt2}", "--compare_base", "--device=cpu",
                                  check=False))


def test_lora_on_a_hugging_face_folder_names_it_as_its_base(tmp_path):
    """The README's GPT-2 recipe with --lora_rank, offline: a tiny GPT-2 in a local folder."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    from model.hf import save_hf_model
    from model.tokenizer import HFTokenizer

    text = learnable_corpus(n_chars=20_000)
    tok = Tokenizer(BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = HFTokenizer(tok.to_str(), None, 0)
    folder, notes, data_root, out_dir = tmp_path / "tiny-gpt2", tmp_path / "notes.txt", tmp_path / "data", tmp_path / "out"
    save_hf_model(tiny_model("gpt2", vocab_size=300, block_size=64), tokenizer, str(folder))
    notes.write_text(text)
    run_script("data/prepare.py", "notes", f"--input={notes}", f"--tokenizer=hf:{folder}", f"--data_root={data_root}")
    fine_tune = ["train.py", f"--init_from=hf:{folder}", "--dataset=notes", f"--data_root={data_root}",
                 f"--out_dir={out_dir}", "--eval_interval=1000", "--batch_size=4", "--block_size=32", "--eval_iters=2",
                 "--log_interval=1", "--sample_tokens=0", "--device=cpu", "--plot=false", "--lora_rank=4",
                 "--lora_dropout=0.1", "--learning_rate=1e-2", "--lr_decay_iters=8"]
    result = run_script(*fine_tune, "--max_iters=4")
    assert "LoRA r=4 on q,v: 1,024 trainable of" in result.stderr and "the base hf:" in result.stderr
    assert load_checkpoint(out_dir)["lora"]["base"] == f"hf:{folder}"
    run_script("train.py", "--init_from=resume", f"--out_dir={out_dir}", "--max_iters=8")  # the base by its name
    straight = tmp_path / "straight"
    run_script(*[a for a in fine_tune if not a.startswith("--out_dir")], f"--out_dir={straight}", "--max_iters=8")
    resumed, once = load_checkpoint(out_dir), load_checkpoint(straight)
    assert all(torch.equal(once["model"][name], resumed["model"][name]) for name in once["model"])
    sampled = run_script("sample.py", f"--out_dir={out_dir}", "--prompt=alpha", "--temperature=0",
                         "--max_new_tokens=8", "--device=cpu")
    assert sampled.stdout.startswith("alpha")
    # the folder's weights change: the adapter no longer fits
    changed = tiny_model("gpt2", vocab_size=300, block_size=64)
    with torch.no_grad():
        changed.ln_f.weight += 0.01
    save_hf_model(changed, tokenizer, str(folder))
    refused = run_script("sample.py", f"--out_dir={out_dir}", "--device=cpu", check=False)
    assert_clean_error(refused)
    assert f"hf:{folder}" in refused.stderr and "has changed" in refused.stderr
