import json
import shutil

from conftest import assert_clean_error, run_script


def test_bench_reports_training_generation_and_run_py_side_by_side(tiny_char_data, tmp_path):
    # a tiny preset in place of the two default training shapes (the larger alone took 20 s here)
    preset = tmp_path / "tiny.toml"
    preset.write_text("n_layer = 2\nn_head = 2\nn_embd = 32\nblock_size = 32\nbatch_size = 4\n")
    result = run_script("bench.py", "--sections=train,generate,runpy", "--repeats=1", "--new_tokens=5",
                        "--train_steps=15", f"--train_config={preset}", f"--data_root={tiny_char_data}",
                        "--dataset=tiny", "--device=cpu", "--json")
    report = json.loads(result.stdout)
    figures = {(f["measurement"], f["setting"]): f["value"] for f in report["figures"]}
    measured = {measurement for measurement, _ in figures}
    assert {"train tokens/s", "train peak memory", "sample.py generation", "KV cache speed-up",
            "sample.py tokens/s", "sample.py first token", "run.py tokens/s", "run.py first token",
            "sample.py vs run.py"} <= measured
    assert all(value > 0 for value in figures.values())
    assert ("KV cache speed-up", "ctx 256") in figures and ("KV cache speed-up", "ctx 1024") in figures
    assert "cores" in report["machine"]


def test_bench_refuses_an_unknown_section():
    assert_clean_error(run_script("bench.py", "--sections=everything", check=False))


def test_bench_recipe_reports_loss_and_time_to_target_per_variant(tiny_char_data):
    result = run_script("bench.py", "--sections=recipe", "--recipe_seconds=4",
                        "--recipe_variants=baseline (nanoGPT CPU),+ Muon", f"--data_root={tiny_char_data}",
                        "--recipe_dataset=tiny", "--device=cpu", "--json")
    figures = json.loads(result.stdout)["figures"]
    names = [f["measurement"] for f in figures]
    assert names == ["recipe: baseline (nanoGPT CPU)"] * 2 + ["recipe: + Muon"] * 2
    losses = [f["value"] for f in figures if f["unit"] == "nats"]
    assert all(0 < loss < 5 for loss in losses)  # the tiny corpus's 25 characters: ln 25 = 3.2 at the start


def test_bench_real_says_what_to_pass_without_a_model():
    result = run_script("bench.py", "--sections=real")
    assert "--model=hf:" in result.stderr


def test_bench_real_compares_ours_with_transformers_on_one_model(tmp_path):
    """A tiny Llama saved by transformers, as a real model would be: every figure of ours in
    float32 and 8 bits and of transformers, with the same bits per byte from both float32 runs.
    (One round: a second would run every program again, for no figure this test checks.)"""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.tokenizer import BytePairTokenizer, tokenizer_json

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
                     ).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "tokenizer.json").write_text(json.dumps(tokenizer_json(
        BytePairTokenizer("bpe", {bytes([i]): i for i in range(256)}))))
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 25)  # 1,350 one-byte tokens
    result = run_script("bench.py", "--sections=real", f"--model=hf:{tmp_path / 'model'}", f"--text={text}",
                        "--repeats=1", "--real_rounds=1", "--real_tokens=4", "--prompt_tokens=50", "--bpb_tokens=1024", "--json")
    figures = {(f["measurement"], f["setting"]): f["value"] for f in json.loads(result.stdout)["figures"]}
    programs = ("sample.py float32", "sample.py --quant=q8_0", "transformers float32")
    for program in programs:
        values = [v for (m, _), v in figures.items() if m.endswith(program)]
        # ours also say the bytes of weights a token reads, and the memory speed that makes
        assert len(values) == (5 if program.startswith("transformers") else 7) and all(v > 0 for v in values)
    # int8 numbers and a float32 scale per row, against float32 numbers: a little under 4x fewer bytes
    assert 3.5 < figures[("q8_0 here vs float32 here", "bytes of weights a token reads (inverse)")] < 4
    assert "sample.py float32 computes new tokens each in C" in result.stderr or shutil.which("cc") is None
    bpb = {m.split(": ", 1)[1]: v for (m, s), v in figures.items() if s.startswith("bits per byte")}
    assert abs(bpb["sample.py float32"] - bpb["transformers float32"]) < 1e-4
    assert abs(bpb["sample.py --quant=q8_0"] - bpb["sample.py float32"]) < 0.05
