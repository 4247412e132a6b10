"""Hugging Face models in and out, checked against transformers itself (the outside reference).

Tiny random models are built here with transformers and saved with save_pretrained, beside a
tokenizer trained with the `tokenizers` library, so nothing is downloaded. Their init is scaled
up (initializer_range=0.2) so the most likely token is clearly ahead and greedy text is stable.
"""

import json
import os
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_MODEL, assert_clean_error, learnable_corpus, run_script
from model.gpt import GPT, GPTConfig, KVCache
from model.hf import gpt_config, load_hf_model, save_hf_model
from model.tokenizer import BytePairTokenizer, char_tokenizer_from_text, tokenizer_json, train_bpe

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
        "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
        "Ünïcödé, 日本語 and emoji 😀 in     odd   whitespace\t\r\n") * 30
PROMPT = "The quick brown fox"

LLAMA = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
MODELS = {
    "gpt2": dict(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
                 layer_norm_epsilon=1e-4, bos_token_id=0, eos_token_id=0),
    # grouped-query attention, untied head, an unusual theta and eps, Llama 3.1's rope scaling
    "llama_gqa_untied": dict(LLAMA, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=5000.0,
                             rms_norm_eps=1e-3, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                              "original_max_position_embeddings": 16}),
    # tied embeddings, and a head size that is not hidden_size / heads (as Gemma-style configs do)
    "llama_tied": dict(LLAMA, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=123.0,
                       rms_norm_eps=1e-6, head_dim=24),
}


def train_tokenizer(with_bos):
    """A byte-level BPE trained on TEXT; the Llama one adds <s> before every text, as Llama's does."""
    specials = ["<|endoftext|>"] if not with_bos else ["<unk>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT], trainer)
    if with_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


def build(folder, name, dtype=torch.float32):
    torch.manual_seed(0)
    if name == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**MODELS[name]))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODELS[name]))
    model.to(dtype).save_pretrained(folder)
    train_tokenizer(with_bos=name != "gpt2").save(os.path.join(folder, "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: build(str(root / name), name) for name in MODELS}


def reference(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def greedy_text(model, tokenizer, prompt, max_new_tokens):
    """transformers' greedy generate, as text: the prompt, then the new tokens (up to eos)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    if model.generation_config.eos_token_id in new:
        new = new[:new.index(model.generation_config.eos_token_id)]
    return prompt + tokenizer.decode(new)


@pytest.mark.parametrize("name", MODELS)
def test_logits_equal_transformers_at_every_position(folders, name):
    ours, tokenizer = load_hf_model(folders[name])
    theirs, their_tokenizer = reference(folders[name])
    ids = torch.randint(0, 320, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (ours(ids)[0] - theirs(ids).logits).abs().max().item()
    assert difference < 1e-4
    assert ours.wte.weight.dtype == torch.float32
    assert tokenizer.encode_prompt(PROMPT) == their_tokenizer(PROMPT)["input_ids"]  # BOS included for llama
    text = TEXT[:400]
    assert tokenizer.decode(tokenizer.encode(text)) == their_tokenizer.decode(their_tokenizer(text)["input_ids"],
                                                                             skip_special_tokens=True) == text
    assert tokenizer.decode_bytes(tokenizer.encode(text)).decode() == text


@pytest.mark.parametrize("name", MODELS)
def test_sample_greedy_text_equals_transformers_generate(folders, name):
    result = run_script("sample.py", f"--init_from=hf:{folders[name]}", f"--prompt={PROMPT}", "--temperature=0",
                        "--max_new_tokens=24", "--device=cpu")
    assert result.stdout == greedy_text(*reference(folders[name]), PROMPT, 24) + "\n"


def test_explain_json_probabilities_match_transformers(folders):
    folder = folders["llama_gqa_untied"]
    result = run_script("explain.py", f"--init_from=hf:{folder}", f"--prompt={PROMPT}", "--json", "--top=3",
                        "--device=cpu")
    doc = json.loads(result.stdout)
    model, tokenizer = reference(folder)
    ids = tokenizer(PROMPT)["input_ids"]
    assert [t["id"] for t in doc["tokens"]] == ids
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0].softmax(-1)
    for position in doc["positions"]:
        values, indices = probs[position["position"]].topk(3)
        assert [c["id"] for c in position["top"]] == indices.tolist()
        assert [c["prob"] for c in position["top"]] == pytest.approx(values.tolist(), abs=1e-5)
    assert doc["checkpoint"]["step"] is None and doc["checkpoint"]["init_from"] == f"hf:{folder}"


def test_sentencepiece_style_tokenizers_stream_what_transformers_decodes(tmp_path):
    """Llama 2 / TinyLlama style: '▁' marks a space, unknown characters fall back to <0xNN> byte
    tokens, and the decoder strips the text's first space. Streaming token by token must still
    give transformers' decoded text."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.train_from_iterator([TEXT.replace("日本語", "")], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    spec = json.loads(tokenizer.to_str())
    size = len(spec["model"]["vocab"])
    spec["model"]["vocab"].update({f"<0x{b:02X}>": size + b for b in range(256)})
    folder = str(tmp_path / "sp")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(LLAMA, vocab_size=size + 256))).save_pretrained(folder)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    prompt = "The fox 日本"  # 日本 is not in the vocabulary: six byte tokens
    result = run_script("sample.py", f"--init_from=hf:{folder}", f"--prompt={prompt}", "--temperature=0",
                        "--max_new_tokens=24", "--device=cpu")
    model, their_tokenizer = reference(folder)
    ours = load_hf_model(folder)[1]
    inputs = their_tokenizer(prompt, return_tensors="pt")
    prompt_ids = inputs["input_ids"][0].tolist()
    assert prompt_ids[0] == 1 and ours.encode_prompt(prompt) == prompt_ids  # <s>, then the text
    assert ours.decode(prompt_ids[1:]) == their_tokenizer.decode(prompt_ids, skip_special_tokens=True) == prompt
    with torch.no_grad():
        new = model.generate(**inputs, max_new_tokens=24, do_sample=False)[0, len(prompt_ids):].tolist()
    if 2 in new:
        new = new[:new.index(2)]
    # Byte by byte (a run of byte tokens that is not valid UTF-8 shows as U+FFFD, where the
    # tokenizers library would blank out the whole run, prompt bytes included)
    assert result.stdout == prompt + ours.decode_bytes(new).decode("utf-8", errors="replace") + "\n"
    if "\ufffd" not in their_tokenizer.decode(new):
        assert result.stdout == their_tokenizer.decode(prompt_ids + new, skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("name", MODELS)
def test_hf_to_ours_to_hf_gives_identical_tensors(folders, name, tmp_path):
    model, tokenizer = load_hf_model(folders[name])
    save_hf_model(model, tokenizer, str(tmp_path / "out"))
    original = load_file(os.path.join(folders[name], "model.safetensors"))
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(written) == set(original)
    for key in original:
        assert torch.equal(written[key], original[key]), key
    reloaded, _ = reference(str(tmp_path / "out"))
    ids = torch.tensor([[5, 17, 200, 3, 99]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, reference(folders[name])[0](ids).logits)


def test_sharded_bf16_and_pytorch_bin_weights_load(folders, tmp_path):
    expected, _ = load_hf_model(folders["llama_gqa_untied"])
    # a sharded index of bf16 safetensors: read as float32
    sharded = str(tmp_path / "sharded")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODELS["llama_gqa_untied"])).to(
        torch.bfloat16).save_pretrained(sharded, max_shard_size="40KB")
    shutil.copy(os.path.join(folders["llama_gqa_untied"], "tokenizer.json"), sharded)
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    model, _ = load_hf_model(sharded)
    for (name, ours), theirs in zip(model.state_dict().items(), expected.state_dict().values()):
        assert ours.dtype == torch.float32
        assert torch.equal(ours, theirs.to(torch.bfloat16).float()), name
    # pytorch_model.bin (read with weights_only=True) when there is no safetensors file
    legacy = str(tmp_path / "legacy")
    shutil.copytree(folders["gpt2"], legacy)
    os.remove(os.path.join(legacy, "model.safetensors"))
    torch.save(load_file(os.path.join(folders["gpt2"], "model.safetensors")), os.path.join(legacy, "pytorch_model.bin"))
    model, _ = load_hf_model(legacy)
    reference_model, _ = load_hf_model(folders["gpt2"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference_model.state_dict().values()))
    # GPT-2's files on the hub name their tensors without the "transformer." prefix
    unprefixed = str(tmp_path / "unprefixed")
    shutil.copytree(folders["gpt2"], unprefixed)
    tensors = load_file(os.path.join(unprefixed, "model.safetensors"))
    save_file({name.removeprefix("transformer."): t for name, t in tensors.items()},
              os.path.join(unprefixed, "model.safetensors"), metadata={"format": "pt"})
    model, _ = load_hf_model(unprefixed)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference_model.state_dict().values()))


def test_config_json_of_transformers_4_and_5_both_read(folders):
    with open(os.path.join(folders["llama_gqa_untied"], "config.json")) as f:
        v5 = json.load(f)  # written by the transformers 5.x installed here
    rope = dict(v5.get("rope_parameters") or v5["rope_scaling"])
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype")}
    v4.update(torch_dtype="float32", rope_theta=rope.pop("rope_theta", 5000.0),
              rope_scaling={"type": rope.pop("rope_type"), **rope})  # 4.x files may say "type"
    assert gpt_config(v4) == gpt_config(v5)
    config = gpt_config(v5)
    assert (config.n_kv_head, config.rope_theta, config.norm_eps, config.tie_embeddings) == (2, 5000.0, 1e-3, False)
    assert config.rope_scaling["factor"] == 8.0


@pytest.mark.parametrize("kind", ["char", "bpe", "gpt2"])
def test_tokenizer_json_gives_our_ids(kind):
    texts = [TEXT, "  leading and trailing  \n\n", "don't we'll 12345 a1b2 $$$ ---", "\u00a0\u2028\r\n\t x",
             "<|endoftext|> stays text", "😀😀 日本語 Ünïcödé"]
    if kind == "char":
        ours = char_tokenizer_from_text("".join(texts))
    else:
        bpe = train_bpe([TEXT * 3], 400)
        ours = bpe if kind == "bpe" else BytePairTokenizer("gpt2", bpe.ranks)  # gpt2: the same code, GPT-2's ranks
    theirs = Tokenizer.from_str(json.dumps(tokenizer_json(ours)))
    theirs.encode_special_tokens = True  # as our encode: a typed "<|endoftext|>" is text
    for text in texts:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False).ids == ids, text
        assert theirs.decode(ids) == ours.decode(ids) == text


def test_kv_cache_holds_only_what_generation_needs():
    config = GPTConfig(arch="llama", vocab_size=50, block_size=131072, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    assert KVCache(config, 1, "cpu", torch.float32, max_length=30).keys.shape == (2, 1, 2, 30, 8)
    model = GPT(config).eval()
    assert len(list(model.generate([1, 2, 3], 10, temperature=0))) == 10


def test_old_checkpoint_configs_get_the_new_fields_defaults():
    config = GPTConfig(**dict(arch="llama", vocab_size=50, block_size=16, n_layer=1, n_head=4, n_embd=32,
                              dropout=0.0, vocab_pad_multiple=1, rope_theta=10000.0))
    assert (config.n_kv_head, config.head_size, config.mlp_hidden, config.tie_embeddings) == (4, 8, 128, True)
    assert GPTConfig(**__import__("dataclasses").asdict(config)) == config


@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("data")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(learnable_corpus(20_000) + "Ünïcödé 日本語 😀\n")
    data_root = tmp_path / "data"
    for kind in ("char", "bpe"):
        run_script("data/prepare.py", f"tiny_{kind}", f"--input={corpus}", f"--tokenizer={kind}",
                   "--vocab_size=300", f"--data_root={data_root}")
    return data_root


@pytest.mark.parametrize("arch,tokenizer", [("gpt2", "char"), ("llama", "bpe")])
def test_a_model_trained_here_loads_in_transformers(prepared_data, tmp_path, arch, tokenizer):
    out = tmp_path / "out"
    run_script("train.py", f"--dataset=tiny_{tokenizer}", f"--data_root={prepared_data}", f"--out_dir={out}",
               f"--arch={arch}", "--max_iters=10", "--eval_interval=10", "--plot=false", *TINY_MODEL)
    run_script("export.py", f"--out_dir={out}", "--format=hf", f"--output={tmp_path / 'hf'}")
    model, hf_tokenizer = reference(str(tmp_path / "hf"))
    prompt = "alpha bravo ö"
    from model.checkpoint import load_model

    ours, our_tokenizer, _ = load_model("resume", str(out))
    assert hf_tokenizer(prompt)["input_ids"] == our_tokenizer.encode(prompt)
    sampled = run_script("sample.py", f"--out_dir={out}", f"--prompt={prompt}", "--temperature=0",
                         "--max_new_tokens=20", "--device=cpu")
    assert sampled.stdout == greedy_text(model, hf_tokenizer, prompt, 20) + "\n"


# ---- bad input: exit 2, one line, nothing written ------------------------------------------

def broken_copy(folders, tmp_path, change):
    folder = tmp_path / "broken"
    shutil.copytree(folders["llama_gqa_untied"], folder)
    change(folder)
    return folder


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-1000])


BAD_INPUTS = {
    "missing folder": (None, "no folder"),
    "unsupported architecture": (lambda f: edit_config(f, architectures=["MistralForCausalLM"]), "MistralForCausalLM"),
    "truncated safetensors": (lambda f: truncate(f / "model.safetensors"), "safetensors"),
    "shapes unlike the config": (lambda f: edit_config(f, intermediate_size=100), "do not match the config"),
    "unsupported rope scaling": (lambda f: edit_config(f, rope_parameters={"rope_type": "yarn", "factor": 4.0}), "yarn"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_model_folders_are_refused_clearly_and_nothing_is_written(folders, tmp_path, case):
    change, words = BAD_INPUTS[case]
    folder = tmp_path / "nothing-here" if change is None else broken_copy(folders, tmp_path, change)
    output = tmp_path / "exported"
    for script, *args in (("sample.py", "--device=cpu"), ("export.py", "--format=hf", f"--output={output}"),
                          ("export.py", f"--output={output}.bin")):
        result = run_script(script, f"--init_from=hf:{folder}", *args, check=False)
        assert_clean_error(result)
        assert words in result.stderr
    assert not any(name.startswith("exported") for name in os.listdir(tmp_path))


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("env,init_from,repo", [("offline", "hf:nobody/no-such-model", "nobody/no-such-model"),
                                                ("unreachable", "hf:nobody/no-such-model", "nobody/no-such-model"),
                                                ("offline", "gpt2-medium", "openai-community/gpt2-medium")])
def test_a_hub_id_without_network_fails_within_seconds(tmp_path, env, init_from, repo):
    settings = {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if env == "offline":
        settings["HF_HUB_OFFLINE"] = "1"
    else:
        settings.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    result = run_script("sample.py", f"--init_from={init_from}", "--device=cpu", check=False, env=settings, timeout=60)
    assert_clean_error(result)
    assert repo in result.stderr
