"""8-bit weights and the fast generation paths, each checked against the plain float32 path.

The 8-bit layouts are checked against llama.cpp's own Q8_0 quantizer (the gguf package); the
generation shortcuts (inference-only RMSNorm call, grouped-query attention without copies,
logits of the last position only, int8 products) against the forward pass that training runs;
and model.bin version 3 in run.py against torch holding the very same 8-bit numbers. (The C code
itself, model/kernels.c, is checked in test_kernels.py.)"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import run
from conftest import TINY_MODEL, assert_clean_error, needs_a_c_compiler, run_script
from model.checkpoint import load_checkpoint, load_model, model_from_checkpoint
from model import kernels
from model.gpt import GPT, GPTConfig, KVCache
from model.quant import Int8Linear, dequantize_groups, quantize_groups, quantize_model, quantize_rows

# what rounding every weight to one of 255 levels does to a product (or to a model's logits),
# against the float layer it came from
INT8_TOLERANCE = 0.03
# PyTorch's int8 kernel (the fallback where no C compiler is found) rounds activations to bfloat16,
# 8 significant bits: a product of a few hundred terms is good to about 1% of its size
BFLOAT16_TOLERANCE = 0.01


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(arch, **overrides):
    settings = dict(arch=arch, vocab_size=61, block_size=64, n_layer=2, n_head=4, n_embd=64)
    settings.update(overrides)
    torch.manual_seed(0)
    return GPT(GPTConfig(**settings)).eval()


SHAPES = {"gpt2": dict(arch="gpt2"), "llama-gqa": dict(arch="llama", n_kv_head=2),
          "llama-qk-norm-untied": dict(arch="llama", qk_norm=True, tie_embeddings=False)}


# ---- the 8-bit layouts ----------------------------------------------------------------------

def test_groups_are_llama_cpps_q8_0_number_for_number():
    import gguf

    weight = torch.randn(6, 96, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 6)[:, None]
    weight[2] = 0.0  # an all-zero row
    values, scales = quantize_groups(weight)
    blocks = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(6, 3, 34)
    theirs_scales = blocks[..., :2].copy().view(np.float16)[..., 0]
    theirs_values = blocks[..., 2:].copy().view(np.int8).reshape(6, 96)
    assert np.array_equal(scales.numpy(), theirs_scales)
    assert np.array_equal(values.numpy(), theirs_values)
    error = (dequantize_groups(values, scales) - weight).abs().reshape(6, 3, 32)
    # half a step, plus what storing the scale as float16 moves the largest value (127 steps)
    assert (error <= scales.float()[..., None] * (0.5 + 127 * 2**-11) + 1e-12).all()


def test_row_quantization_is_within_half_a_step():
    weight = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    weight[3] = 0.0
    values, scale = quantize_rows(weight)
    rebuilt = values.float() * scale.float()[:, None]
    assert values.abs().max() <= 127 and values.dtype == torch.int8 and scale.dtype == torch.bfloat16
    assert ((rebuilt - weight).abs() <= scale.float()[:, None] * 0.51 + 1e-12).all()  # clamping aside, half a step
    assert (rebuilt[3] == 0).all()
    few_at_a_time = quantize_rows(weight, rows_at_a_time=7)  # (the rows are rounded in chunks, to bound memory)
    assert torch.equal(few_at_a_time[0], values) and torch.equal(few_at_a_time[1], scale)


# 3 rows: the C kernel; 64 x 40 rows: a prompt (the rebuilt float matrix); 40 and 33 numbers a row:
# not whole vectors of any instruction set (the kernels' leftover loop)
@pytest.mark.parametrize("in_features, rows", [(64, 3), (40, 3), (33, 1), (64, 40)])
@needs_a_c_compiler
def test_int8_linear_matches_the_float_layer_it_came_from(in_features, rows):
    assert kernels.library() is not None, "the C kernel did not build"
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, 48)
    int8 = Int8Linear.from_linear(linear)
    x = torch.randn(rows, 5, in_features)
    with torch.no_grad():
        expected = linear(x)
        got = int8(x)
        # the same 8-bit numbers in float64 arithmetic: only the order of float32 sums differs
        values, scale = quantize_rows(linear.weight)
        same_numbers = F.linear(x.double(), values.double() * scale.double()[:, None], linear.bias.double())
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max() <= INT8_TOLERANCE * expected.abs().max()
    assert (got.double() - same_numbers).abs().max() <= 1e-5 * same_numbers.abs().max()


@pytest.mark.parametrize("missing", ["compiler", "writable cache folder"])
def test_without_a_c_compiler_the_8_bit_model_uses_pytorchs_kernel(missing, monkeypatch, tmp_path):
    if missing == "compiler":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # (so that no library built before is found)
    else:
        (tmp_path / "a-file").write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))  # no folder can be made in it
    monkeypatch.setattr(kernels, "_library", None)
    assert kernels.library() is None
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    int8 = Int8Linear.from_linear(linear)
    x = torch.randn(3, 64)
    with torch.no_grad():
        values, scale = quantize_rows(linear.weight)
        same_numbers = F.linear(x, values.float() * scale.float()[:, None], linear.bias)
        got = int8(x)
    assert (got - same_numbers).abs().max() <= BFLOAT16_TOLERANCE * same_numbers.abs().max()
    assert not torch.equal(got, same_numbers)  # (bfloat16: PyTorch's kernel, not the C one)
    model = quantize_model(tiny("llama"), "q8_0")
    assert model.token_decoder(KVCache(model.config, 1, "cpu", torch.float32, 8)) is None  # (no C token either)
    assert kernels.generation_description(model, "cpu") == (
        "in PyTorch (no C compiler found for model/kernels.c; 8-bit products by PyTorch's int8 kernel)")
    assert len(list(model.generate([1, 2, 3], 5, temperature=0))) == 5


# ---- the generation shortcuts against the forward pass training runs ------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_generation_paths_give_the_training_forward_passes_logits(shape):
    model = tiny(**SHAPES[shape])
    idx = torch.randint(0, 61, (1, 40), generator=torch.Generator().manual_seed(2))
    full, _ = model(idx)  # autograd on: the path training takes (explicit RMSNorm, copied k/v heads)
    with torch.inference_mode():
        cache = KVCache(model.config, 1, "cpu", torch.float32)
        prefill, _ = model(idx[:, :30], kv_cache=cache, last_only=True)
        steps = [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(30, 40)]
    assert prefill.shape == (1, 1, 61)
    assert torch.allclose(prefill[0, -1], full[0, 29], atol=1e-5)
    assert torch.allclose(torch.cat(steps, dim=1), full[:, 30:], atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_tokens_are_those_of_recomputing_the_whole_context(shape):
    model = tiny(**SHAPES[shape])
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    generated = list(model.generate(prompt, 20, temperature=0))
    tokens = list(prompt)
    for _ in range(20):  # argmax of the plain, uncached forward pass at every step
        logits, _ = model(torch.tensor([tokens]))
        tokens.append(int(logits[0, -1].argmax()))
    assert generated == tokens[len(prompt):]


def test_training_gradients_match_transformers_with_grouped_query_attention(tmp_path):
    """The attention code changed for speed; what training computes must not: our loss and
    gradients against transformers' Llama on the same weights (4 query heads, 2 key/value heads)."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from model.hf import load_hf_model
    from model.tokenizer import BytePairTokenizer, tokenizer_json

    torch.manual_seed(0)
    theirs = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=True, initializer_range=0.2))
    theirs.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json(
        BytePairTokenizer("bpe", {bytes([i]): i for i in range(256)}))))
    ours, _ = load_hf_model(str(tmp_path))
    ours.train()
    theirs.train()
    idx = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(3))
    _, our_loss = ours(idx[:, :-1], idx[:, 1:])
    their_loss = theirs(idx, labels=idx).loss  # transformers shifts the labels itself
    assert torch.allclose(our_loss, their_loss, atol=1e-5)
    our_loss.backward()
    their_loss.backward()
    attention = theirs.model.layers[1].self_attn
    their_grad = torch.cat([attention.q_proj.weight.grad, attention.k_proj.weight.grad, attention.v_proj.weight.grad])
    our_grad = ours.blocks[1].attn.c_attn.weight.grad
    assert torch.allclose(our_grad, their_grad, atol=1e-6, rtol=1e-4), (our_grad - their_grad).abs().max()
    assert torch.allclose(ours.wte.weight.grad, theirs.model.embed_tokens.weight.grad, atol=1e-6, rtol=1e-4)


# ---- a trained model through the scripts ------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A char-level llama and gpt2 trained for a few steps: out folders by arch."""
    from conftest import learnable_corpus

    root = tmp_path_factory.mktemp("quant")
    corpus = root / "corpus.txt"
    corpus.write_text(learnable_corpus(n_chars=20_000))
    run_script("data/prepare.py", "tiny", f"--input={corpus}", "--tokenizer=char", f"--data_root={root / 'data'}")
    folders = {}
    for arch in ("llama", "gpt2"):
        folders[arch] = root / arch
        run_script("train.py", *TINY_MODEL, f"--arch={arch}", f"--data_root={root / 'data'}", "--dataset=tiny",
                   f"--out_dir={folders[arch]}", "--max_iters=80", "--eval_interval=80", "--learning_rate=3e-3")
    return folders


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sample_py_q8_0_writes_the_float_models_greedy_text(trained, arch):
    args = ["sample.py", f"--out_dir={trained[arch]}", "--prompt=alpha bravo ", "--max_new_tokens=40",
            "--temperature=0", "--device=cpu"]
    float_text, int8 = run_script(*args).stdout, run_script(*args, "--quant=q8_0")
    assert int8.stdout == float_text and len(float_text) > 40
    assert "in 8 bits (q8_0)" in int8.stderr
    c_or_not = "each in C (model/kernels.c" if kernels.library() else "in PyTorch (no C compiler found"
    assert f"new tokens {c_or_not}" in int8.stderr
    # in-process: the logits of the whole prompt within the stated tolerance
    model, tokenizer, _ = load_model("resume", str(trained[arch]))
    quantized = quantize_model(copy.deepcopy(model), "q8_0")
    idx = torch.tensor([tokenizer.encode("alpha bravo charlie delta echo")])
    with torch.no_grad():
        expected, got = model(idx)[0], quantized(idx)[0]
    assert (got - expected).abs().max() <= INT8_TOLERANCE * expected.abs().max()


def test_unknown_quant_is_refused_clearly(trained):
    assert_clean_error(run_script("sample.py", f"--out_dir={trained['llama']}", "--quant=q4", check=False))
    assert_clean_error(run_script("export.py", f"--out_dir={trained['llama']}", "--quant=q4", check=False))
    assert_clean_error(run_script("export.py", f"--out_dir={trained['llama']}", "--quant=q8_0", "--format=hf",
                                  check=False))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_bin_version_3_runs_like_sample_py_with_the_same_8_bit_numbers(trained, arch, tmp_path):
    folder = trained[arch]
    float_file, int8_file = tmp_path / "float.bin", tmp_path / "int8.bin"
    run_script("export.py", f"--out_dir={folder}", f"--output={float_file}")
    result = run_script("export.py", f"--out_dir={folder}", f"--output={int8_file}", "--quant=q8_0")
    assert "8 bits" in result.stdout
    ours = run.load_model(str(int8_file))
    assert ours.version == 3
    # every matrix shrinks from 32 bits a number to 8 + 16/32 (norms and biases stay float32): 0.266x
    matrices = sum(np.prod(shape) for _, shape in run.weight_layout(ours.config) if len(shape) == 2)
    assert float_file.stat().st_size - int8_file.stat().st_size == matrices * (4 - 1 - 2 / 32)

    model, tokenizer = model_from_checkpoint(load_checkpoint(str(folder)))
    quantized = quantize_model(model.eval(), "q8_0")
    # the file holds the very numbers the model runs with: each matrix rebuilt from them
    for name, matrix in ours.weights.items():
        if matrix.ndim == 2:
            module = quantized.get_submodule(name.rsplit(".", 1)[0])
            rows = len(matrix)
            if name == "wpe.weight":  # (float32 storage: see quantize_model)
                expected = module.weight.detach().numpy()
            else:
                expected = (module.weight_int8[:rows].float() * module.scale[:rows].float()[:, None]).numpy()
            assert np.array_equal(matrix, expected), name
    ids = tokenizer.encode("alpha bravo charlie delta")
    with torch.no_grad():
        expected = quantized(torch.tensor([ids]))[0][0].numpy()
    # both multiply the same numbers in float32; only the order of the sums differs (where no C
    # compiler is found, PyTorch's kernel multiplies instead and rounds activations to bfloat16)
    ours_exactly = kernels.library() is not None
    tolerance = 1e-4 if ours_exactly else BFLOAT16_TOLERANCE
    assert np.abs(run.logits_of(ours, ids) - expected).max() <= tolerance * np.abs(expected).max()
    # greedy text: run.py on the file, sample.py --quant=q8_0 on the checkpoint, as users run them
    prompt = "delta echo "
    run_text = run_script("run.py", str(int8_file), f"--prompt={prompt}", "--max_new_tokens=40",
                          "--temperature=0").stdout
    sample_text = run_script("sample.py", f"--out_dir={folder}", f"--prompt={prompt}", "--max_new_tokens=40",
                             "--temperature=0", "--device=cpu", "--quant=q8_0").stdout
    assert len(run_text) > 40 and (run_text == sample_text or not ours_exactly)


def test_damaged_version_3_file_is_refused_clearly(trained, tmp_path):
    path = tmp_path / "model.bin"
    run_script("export.py", f"--out_dir={trained['llama']}", f"--output={path}", "--quant=q8_0")
    path.write_bytes(path.read_bytes()[:-10])
    assert_clean_error(run_script("run.py", str(path), check=False))


def test_rows_that_are_not_whole_groups_are_refused_clearly(tmp_path):
    from model.checkpoint import checkpoint_of, save_checkpoint
    from model.tokenizer import CharTokenizer

    model = tiny("llama", n_embd=48, n_head=4)  # rows of 48 numbers: one group and a half
    save_checkpoint(checkpoint_of(model, CharTokenizer([chr(65 + i) for i in range(61)])), tmp_path / "ckpt.pt")
    assert_clean_error(run_script("export.py", f"--out_dir={tmp_path}", "--quant=q8_0", check=False))
