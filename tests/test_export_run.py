"""export.py + run.py: the model as one file of numbers, run by numpy alone.

Small models are trained here, for both architectures and all three tokenizers, and the
numpy forward pass, tokenizer and generation loop are checked against the torch ones."""

import json
import random
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import regex
import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

import export
import run
from conftest import TINY_MODEL, assert_clean_error, learnable_corpus, run_script
from model import gpt
from model.checkpoint import load_checkpoint, model_from_checkpoint
from model.gpt import filter_logits
from model.errors import UserError
from model.tokenizer import GPT2_SPLIT_PATTERN, byte_to_unicode

ARCHS = ("gpt2", "llama")
TOKENIZERS = ("char", "bpe", "gpt2")
CASES = [(arch, kind) for arch in ARCHS for kind in TOKENIZERS]
# non-ASCII text inside the training corpus, so the char tokenizer knows these characters too
EXTRA_TEXT = "café naïve über 日本語の文章 😀👍 don't it's we'll 123 4567 x  \t y\n\n"
PROMPTS = ["alpha bravo ", "don't stop, it's 2024!", "café naïve 日本語 😀", "  many   spaces\n\n\ttabs \n",
           "Ωmega ≈ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 العربية हिन्दी ١٢٣ ½ x²", "I'VE we'd you're '  'll  \u00a0nbsp\u3000ideo", ""]

@pytest.fixture
def one_torch_thread():
    """Models this small run fastest on one thread (run_script does the same for its processes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(arch, tokenizer kind) -> folder with ckpt.pt and model.bin, for all six pairs."""
    root = tmp_path_factory.mktemp("export_run")
    corpus = root / "corpus.txt"
    corpus.write_text(learnable_corpus(n_chars=20_000) + EXTRA_TEXT * 20, encoding="utf-8")
    data_root = root / "data"
    prepare = ["data/prepare.py", f"--input={corpus}", f"--data_root={data_root}"]
    run_script(*prepare, "tiny_char", "--tokenizer=char")
    run_script(*prepare, "tiny_bpe", "--tokenizer=bpe", "--vocab_size=300")
    # a GPT-2-format ranks file (tiktoken's text format) made from our own BPE's ranks
    ranks = json.loads((data_root / "tiny_bpe" / "tokenizer.json").read_text())["ranks"]
    (root / "mini.tiktoken").write_text(ranks)
    run_script(*prepare, "tiny_gpt2", "--tokenizer=gpt2", f"--tokenizer_file={root / 'mini.tiktoken'}")
    folders = {(arch, kind): root / f"{arch}_{kind}" for arch, kind in CASES}

    def train(case):
        arch, kind = case
        # Trained just enough that greedy text varies with the context (an untrained model repeats
        # one token). vocab_pad_multiple=64 (the default) pads the embedding: export drops those rows.
        run_script("train.py", *TINY_MODEL, f"--arch={arch}", f"--data_root={data_root}", f"--dataset=tiny_{kind}",
                   f"--out_dir={folders[case]}", "--max_iters=100", "--eval_interval=100", "--learning_rate=1e-2",
                   "--plot=false")

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(train, CASES))
    for folder in folders.values():
        model, tokenizer = model_from_checkpoint(load_checkpoint(str(folder)))
        export.export_model(model, tokenizer, str(folder / "model.bin"))
    return folders


def load_both(folder):
    torch_model, torch_tokenizer = model_from_checkpoint(load_checkpoint(str(folder)))
    return torch_model.eval(), torch_tokenizer, run.load_model(str(folder / "model.bin"))


@pytest.mark.parametrize("arch,kind", CASES)
def test_numpy_logits_match_torch_logits(models, arch, kind):
    torch_model, tokenizer, numpy_model = load_both(models[arch, kind])
    assert torch_model.config.padded_vocab_size > torch_model.config.vocab_size  # padding was dropped
    ids = tokenizer.encode("alpha bravo charlie delta echo foxtrot")[:32]
    with torch.no_grad():
        expected = torch_model(torch.tensor([ids]))[0][0].numpy()
    logits = run.logits_of(numpy_model, ids)
    assert logits.dtype == np.float32 and logits.shape == expected.shape
    assert np.abs(logits - expected).max() < 1e-4


def recording_logits(module, monkeypatch):
    """Keep the logits that `module`'s generate passes to sample_next_token, step by step."""
    seen, sample = [], module.sample_next_token

    def record(logits, *args, **kwargs):
        seen.append(np.array(logits.tolist(), dtype=np.float32))  # a torch tensor or a numpy array
        return sample(logits, *args, **kwargs)

    monkeypatch.setattr(module, "sample_next_token", record)
    return seen


@pytest.mark.parametrize("arch,kind", CASES)
def test_greedy_decoding_matches_torch_token_for_token_past_the_full_context(models, arch, kind, one_torch_thread,
                                                                             monkeypatch):
    # 200 new tokens in a 32-token context: the cache fills and restarts from its last half many times
    torch_model, tokenizer, numpy_model = load_both(models[arch, kind])
    torch_logits, numpy_logits = recording_logits(gpt, monkeypatch), recording_logits(run, monkeypatch)
    prompt_ids = tokenizer.encode("alpha bravo ")
    expected = list(torch_model.generate(prompt_ids, 200, temperature=0))
    assert list(run.generate(numpy_model, prompt_ids, 200, temperature=0)) == expected
    assert len(set(expected)) > 1  # the text depends on the context: not one token over and over
    assert np.abs(np.stack(numpy_logits) - np.stack(torch_logits)).max() < 1e-4  # at every step
    args = ["--prompt=alpha bravo ", "--max_new_tokens=200", "--temperature=0"]
    from_torch = run_script("sample.py", f"--out_dir={models[arch, kind]}", "--device=cpu", *args)
    from_numpy = run_script("run.py", str(models[arch, kind] / "model.bin"), *args)
    assert from_numpy.stdout == from_torch.stdout
    assert "[200 tokens" in from_numpy.stderr and "[200 tokens" in from_torch.stderr


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_prompts_encode_to_the_same_ids_as_the_torch_side(models, kind):
    _, tokenizer, numpy_model = load_both(models["gpt2", kind])
    prompts = PROMPTS if kind != "char" else ["alpha bravo ", EXTRA_TEXT, "café 日本語 😀\n\n don't"]
    for prompt in prompts:
        assert numpy_model.tokenizer.encode(prompt) == tokenizer.encode(prompt), prompt
        assert b"".join(numpy_model.tokenizer.token_bytes[i] for i in tokenizer.encode(prompt)) == prompt.encode()


def test_pre_split_matches_gpt2_regex_on_random_unicode():
    # Python's re has no \p{L} / \p{N}; run.py's stand-in trick must cut text exactly like the regex
    rng = random.Random(0)
    tricky = list(" \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u1680\u2000\u2028\u3000\u200b'sdmtlvreSTD0123_-.,!")
    pool = tricky + [chr(c) for c in range(32, 127)] + list("éßñЖж中文ひらがなカタカナ한국어١٢٣½²ⅫΩ∑😀🇫🇷\u0301")
    splitter = regex.compile(GPT2_SPLIT_PATTERN)
    for _ in range(3000):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 25)))
        assert run.split(text, "gpt2") == splitter.findall(text), repr(text)


def test_top_k_and_top_p_filter_like_the_torch_side():
    rng = np.random.default_rng(0)
    for top_k, top_p in [(None, None), (5, None), (None, 0.5), (10, 0.9), (1, None), (None, 0.01)]:
        logits = rng.normal(size=300).astype(np.float32) * 3
        expected = filter_logits(torch.from_numpy(logits), 0.7, top_k, top_p).numpy()
        np.testing.assert_allclose(run.filter_logits(logits, 0.7, top_k, top_p), expected, rtol=1e-6)


def test_same_seed_same_text_and_another_seed_other_text(models):
    args = ["run.py", str(models["llama", "char"] / "model.bin"), "--prompt=alpha ", "--max_new_tokens=60",
            "--top_k=10", "--top_p=0.95", "--temperature=1.5"]
    first, second, other = run_script(*args, "--seed=1"), run_script(*args, "--seed=1"), run_script(*args, "--seed=2")
    assert first.stdout == second.stdout != other.stdout
    assert first.stdout.startswith("alpha ") and len(first.stdout) > 50


def test_run_py_needs_neither_torch_nor_tiktoken(models, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("torch", "tiktoken", "regex"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not allowed here')\n")
    env = {"PYTHONPATH": str(blocked)}
    assert run_script("-c", "import torch", env=env, check=False).returncode != 0  # the block works
    result = run_script("run.py", str(models["llama", "gpt2"] / "model.bin"), "--prompt=日本語 don't",
                        "--max_new_tokens=30", env=env)
    assert result.stdout.startswith("日本語 don't") and "tokens/s" in result.stderr


def test_export_cli_writes_model_bin_next_to_the_checkpoint(models):
    folder = models["gpt2", "bpe"]
    exported_in_process = (folder / "model.bin").read_bytes()
    result = run_script("export.py", f"--out_dir={folder / 'ckpt.pt'}")
    assert "parameters" in result.stdout
    assert (folder / "model.bin").read_bytes() == exported_in_process
    assert not list(folder.glob("*.tmp"))


def test_the_file_starts_with_the_documented_header(models):
    data = (models["llama", "bpe"] / "model.bin").read_bytes()
    header = struct.unpack_from("<8s13I2f", data)
    magic, version, arch, vocab_size, block_size, n_layer, n_head, n_kv_head, n_embd, head_size = header[:10]
    assert (magic, version, arch, block_size, n_layer, n_head, n_kv_head, n_embd, head_size) == (
        b"GPTMODEL", 2, 1, 32, 2, 2, 2, 32, 16)
    # mlp_hidden, tie_embeddings, mlp_activation (swiglu), qk_norm, norm_eps, logit_softcap
    assert header[10:] == (128, 1, 1, 0, pytest.approx(1e-5), 0.0)
    kind, bos_id, eos_id, starts_with_bos, rule_length = struct.unpack_from("<IiiII", data, 68)
    assert (kind, bos_id, eos_id, starts_with_bos, data[88:88 + rule_length]) == (1, -1, vocab_size - 1, 0, b"gpt2")


def test_bad_model_files_and_prompts_are_refused_clearly(models, tmp_path):
    good = (models["gpt2", "char"] / "model.bin").read_bytes()
    cases = {"text.bin": b"just some text, not a model\n" * 10, "empty.bin": b"",
             "cut_in_tokenizer.bin": good[:70], "cut_in_weights.bin": good[:-100],
             "future_version.bin": good[:8] + struct.pack("<I", 99) + good[12:]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        result = run_script("run.py", str(tmp_path / name), "--prompt=alpha", check=False)
        assert_clean_error(result)
    assert "version 99" in result.stderr
    model_file = str(models["gpt2", "char"] / "model.bin")
    for args in ([str(tmp_path / "missing.bin")], [str(tmp_path)], [model_file, "--prompt=ALPHA"],
                 [model_file, "--temperature=hot"], [model_file, "--top_p=2"], [model_file, "--bogus=1"],
                 [model_file, "--prompt=FILE:/no/such/file"]):
        assert_clean_error(run_script("run.py", *args, check=False))


def test_export_refuses_a_missing_or_damaged_checkpoint_clearly(models, tmp_path):
    assert_clean_error(run_script("export.py", f"--out_dir={tmp_path / 'nothing'}", check=False))
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((models["gpt2", "char"] / "ckpt.pt").read_bytes()[:3000])
    assert_clean_error(run_script("export.py", f"--out_dir={damaged}", check=False))


# ---- version 2: real models' shapes and Hugging Face tokenizers --------------------------------

CORPUS = (learnable_corpus(n_chars=6_000) + EXTRA_TEXT * 10 + "I'm sure they've 3.14159 x=42; y += 7\n" * 20
          + "def f(n):\n    return n * 2  # twice\n\n" * 20)
# varied text: digits, contractions in both cases, CJK, emoji, newlines, whitespace runs, symbols
HF_PROMPTS = PROMPTS[:-1] + ["1234567 + 89 = 1234656", "IT'S THEY'RE I'D we'LL", "\n\n\n   \r\n\t x",
                             "def f(n):\n    return n ** 2\n", "ſ 's 'ſ ²³ ½ ١٢٣٤ x1y22z333"]
SPLITS = {  # run.py's rule -> the `tokenizers` pre-tokenizer it must cut text like
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "digits_gpt2": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "llama3": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(run.LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}


def hf_byte_level_tokenizer(rule, vocab_size=400):
    """A byte-level BPE trained with the `tokenizers` library on a few KB, split like `rule`.
    The llama3 one, like Llama 3's, takes a whole chunk that is a token (ignore_merges) and
    starts every prompt with <|begin_of_text|>."""
    from model.tokenizer import HFTokenizer

    tok = Tokenizer(BPE(ignore_merges=rule == "llama3"))
    tok.pre_tokenizer, tok.decoder = SPLITS[rule](), decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|endoftext|>"]
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos_id, eos_id = tok.token_to_id(specials[0]), tok.token_to_id(specials[1])
    if rule == "llama3":
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[(specials[0], bos_id)])
        return HFTokenizer(tok.to_str(), bos_id, eos_id), tok
    return HFTokenizer(tok.to_str(), None, eos_id), tok


def random_model(config, scale=10.0):
    """A tiny GPT with random weights. Its blocks' weights are scaled up: the greedy text then
    depends on the context (not the last token alone) and has no near-ties between candidates."""
    torch.manual_seed(0)
    model = gpt.GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("blocks.") and ".ln_" not in name:
                p.mul_(scale)
    return model


REAL_SHAPES = {  # what imported models need: GQA, head_size != n_embd / n_head, untied, eps, rope
    "llama_gqa_untied": dict(arch="llama", n_head=4, n_kv_head=2, head_size=12, tie_embeddings=False,
                             norm_eps=1e-6, rope_theta=500.0, mlp_hidden=80),
    "llama_mqa_tied_rope_scaling": dict(arch="llama", n_head=4, n_kv_head=1, norm_eps=1e-5, rope_theta=5e5,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "gpt2_untied": dict(arch="gpt2", n_head=2, tie_embeddings=False, norm_eps=1e-4),
    # the training recipe's options (model/gpt.py): ReLU squared, normalised queries and keys, capped logits
    "gpt2_relu2_qk_norm_softcap": dict(arch="gpt2", n_head=2, mlp_activation="relu2", qk_norm=True, logit_softcap=15.0),
    "llama_relu2_qk_norm_softcap": dict(arch="llama", n_head=4, n_kv_head=2, mlp_activation="relu2", qk_norm=True,
                                        logit_softcap=30.0),
}


@pytest.mark.parametrize("shape,rule", [("llama_gqa_untied", "llama3"), ("llama_mqa_tied_rope_scaling", "digits_gpt2"),
                                        ("gpt2_untied", "gpt2"), ("gpt2_relu2_qk_norm_softcap", "gpt2"),
                                        ("llama_relu2_qk_norm_softcap", "llama3")])
def test_real_model_shapes_and_hf_tokenizers_run_in_numpy_like_torch(shape, rule, tmp_path, one_torch_thread):
    tokenizer, _ = hf_byte_level_tokenizer(rule)
    spare_ids = 6 if shape == "gpt2_untied" else 0  # an embedding may have more rows than the tokenizer ids
    config = gpt.GPTConfig(vocab_size=tokenizer.vocab_size + spare_ids, block_size=48, n_layer=2, n_embd=32,
                           **REAL_SHAPES[shape])
    torch_model = random_model(config)
    export.export_model(torch_model, tokenizer, str(tmp_path / "model.bin"))
    numpy_model = run.load_model(str(tmp_path / "model.bin"))
    assert numpy_model.config.n_kv_head == config.n_kv_head and numpy_model.config.head_size == config.head_size
    prompt_ids = tokenizer.encode_prompt("def f(n):\n    return n")
    assert numpy_model.tokenizer.encode_prompt("def f(n):\n    return n") == prompt_ids
    with torch.no_grad():
        expected = torch_model(torch.tensor([prompt_ids]))[0][0].numpy()
    assert np.abs(run.logits_of(numpy_model, prompt_ids) - expected).max() < 1e-4
    # 100 tokens in a 48-token context: the cache fills and restarts
    greedy = list(torch_model.generate(prompt_ids, 100, temperature=0))
    assert list(run.generate(numpy_model, prompt_ids, 100, temperature=0)) == greedy
    assert len(set(greedy)) > 3


@pytest.mark.parametrize("rule", SPLITS)
def test_run_py_encodes_prompts_to_the_ids_the_tokenizers_library_gives(rule, tmp_path):
    tokenizer, reference = hf_byte_level_tokenizer(rule)
    config = gpt.GPTConfig(arch="llama", vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    export.export_model(gpt.GPT(config), tokenizer, str(tmp_path / "model.bin"))
    ours = run.load_model(str(tmp_path / "model.bin")).tokenizer
    assert ours.split_rule == rule and ours.prompt_starts_with_bos == (rule == "llama3")
    for prompt in HF_PROMPTS:
        assert ours.encode(prompt) == reference.encode(prompt, add_special_tokens=False).ids, prompt
        assert ours.encode_prompt(prompt) == reference.encode(prompt).ids == tokenizer.encode_prompt(prompt), prompt
        assert b"".join(ours.token_bytes[i] for i in ours.encode(prompt)) == prompt.encode()


@pytest.mark.parametrize("rule", SPLITS)
def test_split_rules_cut_random_unicode_like_the_tokenizers_library(rule):
    byte_of = {ch: b for b, ch in byte_to_unicode().items()}
    pre_tokenizer, rng = SPLITS[rule](), random.Random(1)
    tricky = list(" \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u1680\u2000\u2028\u3000\u200b'sdmtlvreSTDLVREMſ0123456789_-.,!")
    pool = tricky + [chr(c) for c in range(32, 127)] + list("éßñЖж中文ひらがなカタカナ한국어١٢٣½²ⅫΩ∑😀🇫🇷\u0301")
    for _ in range(2000):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 25)))
        expected = [bytes(byte_of[ch] for ch in piece) for piece, _ in pre_tokenizer.pre_tokenize_str(text)]
        assert [chunk.encode() for chunk in run.split(text, rule)] == expected, repr(text)


def test_export_says_plainly_that_run_py_cannot_encode_a_sentencepiece_tokenizer(tmp_path):
    from model.tokenizer import HFTokenizer

    tok = Tokenizer(BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()  # TinyLlama's kind
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = HFTokenizer(tok.to_str(), 1, 2)
    config = gpt.GPTConfig(arch="llama", vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    with pytest.raises(UserError, match="run.py cannot encode this model's tokenizer .*Metaspace"):
        export.export_model(gpt.GPT(config), tokenizer, str(tmp_path / "model.bin"))
    assert not (tmp_path / "model.bin").exists()


def write_version_1(model, tokenizer, path):
    """A model.bin as the first format wrote it (README's version 1), to check run.py still reads it."""
    c = model.config
    header = struct.pack("<8s8I2f", b"GPTMODEL", 1, ("gpt2", "llama").index(c.arch), c.vocab_size, c.block_size,
                         c.n_layer, c.n_head, c.n_embd, c.mlp_hidden, 1e-5, c.rope_theta)
    header += struct.pack("<Ii", ("char", "bpe", "gpt2").index(tokenizer.kind), tokenizer.eos_id)
    header += export.length_prefixed(tokenizer.pattern.encode()) + struct.pack("<I", tokenizer.vocab_size)
    header += b"".join(export.length_prefixed(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
    state = model.state_dict()
    with open(path, "wb") as f:
        f.write(header + bytes(-len(header) % 64))
        v1_config = run.Config(c.arch, c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_head, c.n_embd,
                               c.head_size, c.mlp_hidden, True, c.mlp_activation, False, 1e-5, 0.0)
        for name, shape in run.weight_layout(v1_config, 1):
            f.write(state[name][:shape[0]].numpy().astype("<f4").tobytes())


@pytest.mark.parametrize("arch", ARCHS)
def test_version_1_files_still_run(models, arch, tmp_path):
    torch_model, tokenizer, _ = load_both(models[arch, "bpe"])
    write_version_1(torch_model, tokenizer, tmp_path / "v1.bin")
    old = run.load_model(str(tmp_path / "v1.bin"))
    ids = tokenizer.encode("alpha bravo charlie delta")
    with torch.no_grad():
        expected = torch_model(torch.tensor([ids]))[0][0].numpy()
    assert np.abs(run.logits_of(old, ids) - expected).max() < 1e-4
    assert old.tokenizer.encode("don't 日本語 😀") == tokenizer.encode("don't 日本語 😀")


def test_run_py_continues_an_hf_prompt_and_refuses_a_split_rule_it_does_not_know(tmp_path):
    tokenizer, _ = hf_byte_level_tokenizer("llama3")
    config = gpt.GPTConfig(vocab_size=tokenizer.vocab_size, block_size=48, n_layer=2, n_embd=32,
                           **REAL_SHAPES["llama_gqa_untied"])
    torch_model = random_model(config)
    export.export_model(torch_model, tokenizer, str(tmp_path / "model.bin"))
    prompt = "I'm sure 3.14159"
    greedy = list(torch_model.generate(tokenizer.encode_prompt(prompt), 20, temperature=0))
    result = run_script("run.py", str(tmp_path / "model.bin"), f"--prompt={prompt}", "--max_new_tokens=20",
                        "--temperature=0")
    assert result.stdout == prompt + b"".join(tokenizer.token_bytes(i) for i in greedy).decode("utf-8", "replace") + "\n"
    assert f"hf tokenizer; prompt: {len(tokenizer.encode(prompt)) + 1} tokens" in result.stderr  # + <|begin_of_text|>
    data = (tmp_path / "model.bin").read_bytes()
    assert data[88:94] == b"llama3"
    (tmp_path / "other.bin").write_bytes(data[:88] + b"llama9" + data[94:])
    result = run_script("run.py", str(tmp_path / "other.bin"), "--prompt=hi", check=False)
    assert_clean_error(result)
    assert "'llama9'" in result.stderr


@pytest.mark.parametrize("rule", ["llama3", "digits_gpt2"])
def test_a_transformers_llama_exported_for_run_py_writes_what_sample_py_writes(rule, tmp_path):
    # transformers builds the model (GQA, head_dim != hidden/heads, untied, odd rope_theta and eps):
    # an outside reference for export.py --init_from=hf:... and everything run.py reads
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, rust_tokenizer = hf_byte_level_tokenizer(rule)
    folder = tmp_path / "tiny-llama"
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-6,
                         rope_theta=500.0, max_position_embeddings=64, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights: greedy choices without near-ties
        for name, p in model.named_parameters():
            if "layers." in name and "norm" not in name:
                p.mul_(10.0)
    model.save_pretrained(folder)
    rust_tokenizer.save(str(folder / "tokenizer.json"))
    run_script("export.py", f"--init_from=hf:{folder}", f"--output={tmp_path / 'model.bin'}")
    args = ["--prompt=def f(n):\n    return n", "--max_new_tokens=40", "--temperature=0"]
    from_numpy = run_script("run.py", str(tmp_path / "model.bin"), *args)
    from_torch = run_script("sample.py", f"--init_from=hf:{folder}", "--device=cpu", *args)
    assert from_numpy.stdout == from_torch.stdout
    assert "[40 tokens" in from_numpy.stderr
