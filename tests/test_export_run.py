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

import export
import run
from conftest import TINY_MODEL, assert_clean_error, learnable_corpus, run_script
from model import gpt
from model.checkpoint import load_checkpoint, model_from_checkpoint
from model.gpt import filter_logits
from model.tokenizer import GPT2_SPLIT_PATTERN

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
        assert run.gpt2_split(text) == splitter.findall(text), repr(text)


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
    magic, version, arch, vocab_size, block_size, n_layer, n_head, n_embd = struct.unpack_from("<8s7I", data)
    assert (magic, version, arch, block_size, n_layer, n_head, n_embd) == (b"GPTMODEL", 1, 1, 32, 2, 2, 32)
    kind, eos_id, pattern_length = struct.unpack_from("<IiI", data, 48)
    assert (kind, eos_id, data[60:60 + pattern_length].decode()) == (1, vocab_size - 1, GPT2_SPLIT_PATTERN)


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
