"""GGUF in and out, checked against transformers' own GGUF loader and the gguf package.

Tiny random transformers models are built here and written the way llama.cpp's converter
writes them (the gguf package's own tensor-name map, the rotary rows of q and k permuted, its
metadata keys, blocks of several quantization types), so no file is downloaded.
"""

import json
import os

import gguf
import numpy as np
import pytest
import torch

from conftest import assert_clean_error, run_script
from model.checkpoint import checkpoint_of, save_checkpoint
from model.gguf import load_gguf_model, save_gguf_model
from model.gpt import GPT, GPTConfig
from model.tokenizer import char_tokenizer_from_text, train_bpe

transformers = pytest.importorskip("transformers")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
        "In 2024 there were 12345 foxes, 3.14159 of them per km² and 1,000,000 in total.\n"
        "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
        "Ünïcödé, 日本語 and emoji 😀 in     odd   whitespace\t\r\n") * 30
# digits, runs of spaces, newlines, non-ASCII letters, an emoji and a control token
CHECK = "<|im_start|>user\nIn 1999  there were 42 cafés,\n\n  naïve 日本 😀 x²=12345\t end<|im_end|>\n"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# the split rule each pre-tokenizer name stands for, as the `tokenizers` library writes it
SPLITS = {
    "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "llama-bpe": pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}
VOCAB = 384
MODELS = {
    # grouped-query attention and an untied head; rows of 256 numbers, so K-quant blocks fit too
    "llama": dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1,
                  eos_token_id=2),
    # 1024 positions: transformers' GGUF loader reads gpt2.context_length into n_ctx, which its
    # GPT2Config no longer uses, so it builds every GPT-2 with GPT-2's own 1024
    "gpt2": dict(vocab_size=VOCAB, n_positions=1024, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2,
                 layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0),
}
# the block types of the llama.cpp-style file: every type a GGUF commonly holds, one tensor each
LLAMA_TYPES = {"token_embd": Q.Q8_0, "output": Q.Q6_K, "blk.0.attn_q": Q.Q4_0, "blk.0.attn_k": Q.Q5_0,
               "blk.0.attn_v": Q.Q5_1, "blk.0.attn_output": Q.Q4_1, "blk.0.ffn_gate": Q.Q2_K,
               "blk.0.ffn_up": Q.Q3_K, "blk.0.ffn_down": Q.Q4_K, "blk.1.attn_q": Q.Q8_0, "blk.1.attn_k": Q.F16,
               "blk.1.attn_v": Q.BF16, "blk.1.attn_output": Q.Q5_K, "blk.1.ffn_gate": Q.Q6_K}
GPT2_TYPES = {"token_embd": Q.Q8_0, "position_embd": Q.F16, "blk.0.attn_qkv": Q.Q4_0, "blk.0.ffn_up": Q.Q5_1,
              "blk.1.attn_output": Q.Q4_1, "blk.1.ffn_down": Q.Q4_K}
# where each K-quant block keeps its float16 scales (d, and dmin where there is one), in bytes
K_SCALES = {Q.Q2_K: (80, 84), Q.Q3_K: (108, 110), Q.Q4_K: (0, 4), Q.Q5_K: (0, 4), Q.Q6_K: (208, 210)}


def train_tokenizer(pre):
    tokenizer = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tokenizer.pre_tokenizer = SPLITS[pre]
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT], trainer)
    return tokenizer


def blocks(values, qtype, rng):
    """values in `qtype`'s blocks: gguf's quantizer where it has one; random blocks with small
    scales for the K-quants (the gguf package dequantizes them, but cannot make them)."""
    if qtype not in K_SCALES:
        return gguf.quants.quantize(values, qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (values.shape[0], values.shape[1] // block_size, type_size), dtype=np.uint8)
    start, stop = K_SCALES[qtype]
    scales = np.full((*data.shape[:2], (stop - start) // 2), 2e-4 if qtype == Q.Q6_K else 1e-3, dtype=np.float16)
    data[:, :, start:stop] = scales.view(np.uint8)
    return data.reshape(values.shape[0], -1)


def permute_for_llama_cpp(weights, heads):
    # llama.cpp's converter (LlamaModel.permute) reorders each head's rows for its RoPE pairing
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def write_llama_cpp_file(path, hf_model, tokenizer, pre, types, add_bos=False, default_type=Q.F32):
    """A GGUF as llama.cpp's convert_hf_to_gguf.py writes one: its metadata, the gguf package's
    names for every tensor, q and k rows permuted, and matrices in the given block types (else
    default_type)."""
    c = hf_model.config
    arch = "gpt2" if c.model_type == "gpt2" else "llama"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    if arch == "llama":
        writer.add_block_count(c.num_hidden_layers)
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.num_attention_heads)
        writer.add_head_count_kv(c.num_key_value_heads)
        writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        writer.add_vocab_size(c.vocab_size)
        writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    else:
        writer.add_block_count(c.n_layer)
        writer.add_context_length(c.n_positions)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(4 * c.n_embd)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(c.layer_norm_epsilon)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GPT2,
                                     hf_model.config.num_hidden_layers)
    rng = np.random.default_rng(0)
    for hf_name, tensor in hf_model.state_dict().items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")) or (arch == "gpt2" and hf_name == "lm_head.weight"):
            continue  # GPT-2's causal-mask buffers and its tied head are not written
        values = tensor.float().numpy()
        if hf_name.endswith("q_proj.weight"):
            values = permute_for_llama_cpp(values, c.num_attention_heads)
        if hf_name.endswith("k_proj.weight"):
            values = permute_for_llama_cpp(values, c.num_key_value_heads)
        if arch == "gpt2" and hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            values = values.T  # GPT-2's Conv1D stores (in, out)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        qtype = types.get(name.rsplit(".", 1)[0], default_type) if values.ndim == 2 else Q.F32
        if qtype == Q.F32:
            writer.add_tensor(name, np.ascontiguousarray(values))
        elif qtype == Q.F16:
            writer.add_tensor(name, values.astype(np.float16))
        else:
            writer.add_tensor(name, blocks(np.ascontiguousarray(values), qtype, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_hf_model(name):
    torch.manual_seed(0)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**MODELS[name])).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**MODELS[name])).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """For each arch: the transformers model, and llama.cpp-style files of it (float32, Q8_0, and
    a mix of block types) in one folder."""
    root = tmp_path_factory.mktemp("gguf")
    tokenizer = train_tokenizer("smollm")
    out = {"root": root, "tokenizer": tokenizer}
    for name in MODELS:
        model = build_hf_model(name)
        out[name] = model
        types = LLAMA_TYPES if name == "llama" else GPT2_TYPES
        for kind, table, default in (("f32", {}, Q.F32), ("q8_0", {}, Q.Q8_0), ("mixed", types, Q.F32)):
            write_llama_cpp_file(root / f"{name}-{kind}.gguf", model, tokenizer, "smollm", table, default_type=default)
    return out


def transformers_gguf(folder, name):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name).eval()


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out[0] if isinstance(out, tuple) else out.logits).float()


IDS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("kind", ["f32", "mixed"])
def test_a_llama_cpp_file_imports_with_transformers_logits(files, arch, kind):
    ours, _ = load_gguf_model(str(files["root"] / f"{arch}-{kind}.gguf"))
    theirs = transformers_gguf(files["root"], f"{arch}-{kind}.gguf")
    assert (logits(ours, IDS) - logits(theirs, IDS)).abs().max().item() < 1e-4
    if kind == "f32":  # and both equal the model the file was written from
        assert (logits(ours, IDS) - logits(files[arch], IDS)).abs().max().item() < 1e-4


def test_the_rotary_row_order_is_what_the_logits_check_catches(files, monkeypatch):
    """Read without undoing llama.cpp's row order, the model differs clearly: the test above can fail."""
    import model.gguf

    monkeypatch.setattr(model.gguf, "rotary_rows_from_gguf", lambda rows, heads: rows)
    ours, _ = load_gguf_model(str(files["root"] / "llama-f32.gguf"))
    assert (logits(ours, IDS) - logits(files["llama"], IDS)).abs().max().item() > 0.1


@pytest.mark.parametrize("pre", SPLITS)
def test_tokenizer_ids_equal_the_original_and_transformers_gguf_tokenizer(files, tmp_path, pre):
    original = train_tokenizer(pre)
    name = f"tok-{pre}.gguf"
    write_llama_cpp_file(tmp_path / name, files["gpt2"], original, pre, {}, add_bos=True)
    _, ours = load_gguf_model(str(tmp_path / name))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=name)
    text = TEXT[:600] + CHECK
    assert ours.encode(text, allow_special=True) == original.encode(text, add_special_tokens=False).ids
    # transformers' GGUF tokenizer knows no "smollm" rule (it splits such files as gpt-2 does),
    # so its digits differ there; everywhere else its ids are the reference
    if pre != "smollm":
        assert ours.encode_prompt(text) == theirs(text)["input_ids"]
    assert ours.encode_prompt("hi")[0] == 1  # the file says prompts start with BOS
    assert ours.decode(ours.encode(text)) == text
    assert "<|im_start|>" not in ours.decode(ours.encode("<|im_start|>")[1:])  # typed by a user, it stays text
    assert ours.chat_template == TEMPLATE and ours.eos_id == 2


def test_model_bin_and_run_py_split_digits_as_the_gguf_says(files, tmp_path):
    """--init_from=FILE.gguf through export.py to model.bin: run.py (numpy alone) writes the same
    greedy text as sample.py, with SmolLM2's one-digit-at-a-time split."""
    path = files["root"] / "llama-q8_0.gguf"
    prompt = ["--prompt=In 2024 there were 12345 foxes", "--max_new_tokens=12"]
    sampled = run_script("sample.py", f"--init_from={path}", *prompt, "--temperature=0", "--device=cpu").stdout
    run_script("export.py", f"--init_from={path}", f"--output={tmp_path / 'model.bin'}")
    assert run_script("run.py", str(tmp_path / "model.bin"), *prompt, "--temperature=0").stdout == sampled


def our_model(arch, tokenizer):
    torch.manual_seed(1)
    config = GPTConfig(arch=arch, vocab_size=tokenizer.vocab_size + 3, block_size=1024, n_layer=2, n_head=4,
                       n_kv_head=2 if arch == "llama" else 0, n_embd=64, tie_embeddings=arch == "gpt2")
    return GPT(config).eval()


# how far the logits of each stored form may be from our float32 model's, relative to the largest
# logit (measured: f16 0.0004, q8_0 0.009, q4_0 0.14): float16 keeps 11 significant bits, q8_0
# 8 bits and q4_0 4 bits per number, with one float16 scale per block of 32
TOLERANCE = {"f32": 1e-6, "f16": 1e-3, "q8_0": 0.02, "q4_0": 0.2}


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("quant", TOLERANCE)
def test_every_file_we_write_loads_in_transformers(tmp_path, arch, quant):
    tokenizer = train_bpe([TEXT], 300)
    model = our_model(arch, tokenizer)
    if quant == "q8_0":  # as a user does it
        save_checkpoint(checkpoint_of(model, tokenizer), tmp_path / "ckpt.pt")
        run_script("export.py", f"--init_from={tmp_path / 'ckpt.pt'}", "--format=gguf",
                   f"--output={tmp_path / 'out.gguf'}", f"--quant={quant}")
    else:
        save_gguf_model(model, tokenizer, tmp_path / "out.gguf", quant)
    theirs = transformers_gguf(tmp_path, "out.gguf")
    reread, reread_tokenizer = load_gguf_model(str(tmp_path / "out.gguf"))
    ids = IDS % tokenizer.vocab_size
    # transformers and we read the same numbers from the file...
    assert (logits(reread, ids) - logits(theirs, ids)).abs().max().item() < 1e-4
    # ...which are our model's, up to the stored form's rounding
    reference = logits(model, ids)
    assert (logits(reread, ids) - reference).abs().max().item() < TOLERANCE[quant] * reference.abs().max().item()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="out.gguf")
    text = TEXT[:600] + CHECK
    assert reread_tokenizer.encode(text) == tokenizer.encode(text) == their_tokenizer(text)["input_ids"]


def test_a_character_tokenizer_is_refused_naming_the_fix(tmp_path):
    tokenizer = char_tokenizer_from_text("hello world, 123\n")
    save_checkpoint(checkpoint_of(our_model("llama", tokenizer), tokenizer), tmp_path / "ckpt.pt")
    result = run_script("export.py", f"--init_from={tmp_path / 'ckpt.pt'}", "--format=gguf", check=False)
    assert_clean_error(result)
    assert "--tokenizer=bpe" in result.stderr and not (tmp_path / "model.gguf").exists()


def test_import_then_export_gives_the_same_tensors(files, tmp_path):
    """float32 bit for bit, q8_0 the very same blocks, under the same names and types."""
    for arch in MODELS:
        for quant in ("f32", "q8_0"):
            source = files["root"] / f"{arch}-{quant}.gguf"
            model, tokenizer = load_gguf_model(str(source))
            save_gguf_model(model, tokenizer, tmp_path / "again.gguf", quant)
            before = {t.name: t for t in gguf.GGUFReader(source).tensors}
            after = {t.name: t for t in gguf.GGUFReader(tmp_path / "again.gguf").tensors}
            assert sorted(before) == sorted(after)
            for name, tensor in before.items():
                assert after[name].tensor_type == tensor.tensor_type, name
                assert np.asarray(after[name].data).tobytes() == np.asarray(tensor.data).tobytes(), name
            if quant == "f32":  # an imported model (hf tokenizer) written back loads in transformers too
                theirs = transformers_gguf(tmp_path, "again.gguf")
                assert (logits(model, IDS) - logits(theirs, IDS)).abs().max().item() < 1e-4
                their_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="again.gguf")
                assert tokenizer.encode(CHECK, allow_special=True) == their_tokenizer(CHECK)["input_ids"]


def test_recipe_options_are_refused_for_gguf(tmp_path):
    tokenizer = train_bpe([TEXT], 300)
    model = GPT(GPTConfig(arch="llama", vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32, qk_norm=True))
    save_checkpoint(checkpoint_of(model, tokenizer), tmp_path / "ckpt.pt")
    result = run_script("export.py", f"--init_from={tmp_path / 'ckpt.pt'}", "--format=gguf",
                        f"--output={tmp_path / 'x.gguf'}", check=False)
    assert_clean_error(result)
    assert "qk_norm" in result.stderr and not (tmp_path / "x.gguf").exists()


def bad_files(files, root):
    good = (files["root"] / "gpt2-f32.gguf").read_bytes()
    (root / "text.gguf").write_text("not a GGUF file at all\n")
    (root / "truncated.gguf").write_bytes(good[:len(good) // 2])
    model, tokenizer = files["gpt2"], files["tokenizer"]
    write_llama_cpp_file(root / "pre.gguf", model, tokenizer, "qwen2", {})
    writer = gguf.GGUFWriter(str(root / "arch.gguf"), "mamba")  # an architecture llama.cpp has and we do not
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # one tensor's type id changed to a number that no GGUF type has
    field = gguf.GGUFReader(files["root"] / "gpt2-f32.gguf").tensors[0].field
    type_offset = field.offset + sum(part.nbytes for part in field.parts[:-2])  # name, dims, then the type
    broken = bytearray(good)
    broken[type_offset:type_offset + 4] = (99).to_bytes(4, "little")
    (root / "type.gguf").write_bytes(bytes(broken))


@pytest.mark.parametrize("case, message", [("missing", "no GGUF file"), ("text", "not a readable GGUF"),
                                           ("truncated", "GGUF"), ("arch", "architecture 'mamba'"),
                                           ("type", "GGUF"), ("pre", "pre-tokenizer 'qwen2'")])
def test_bad_gguf_files_are_refused_clearly(files, tmp_path_factory, case, message):
    root = tmp_path_factory.getbasetemp() / "bad"
    if not root.exists():
        root.mkdir()
        bad_files(files, root)
    result = run_script("sample.py", f"--init_from={root / (case + '.gguf')}", "--device=cpu", check=False)
    assert_clean_error(result)
    assert message in result.stderr, result.stderr


def test_a_lora_run_on_a_gguf_base_records_its_path_and_hash(files, tmp_path):
    """data/prepare.py --tokenizer=FILE.gguf, train.py --init_from=FILE.gguf --lora_rank, then
    sample.py on the run: the adapter names its base file and the SHA-256 of its weights."""
    base = files["root"] / "llama-q8_0.gguf"
    (tmp_path / "notes.txt").write_text("".join(f"note {i}: buy milk, call bob.\n" for i in range(200)))
    prepared = run_script("data/prepare.py", "notes", f"--input={tmp_path / 'notes.txt'}", f"--tokenizer={base}",
                          f"--data_root={tmp_path / 'data'}")
    assert f"the tokenizer of {base}" in prepared.stderr
    out = tmp_path / "out"
    run_script("train.py", f"--init_from={base}", "--lora_rank=4", "--dataset=notes", f"--data_root={tmp_path / 'data'}",
               f"--out_dir={out}", "--block_size=32", "--batch_size=4", "--max_iters=3", "--eval_interval=3",
               "--eval_iters=1", "--sample_tokens=0", "--plot=false", "--device=cpu")
    settings = torch.load(out / "ckpt.pt", weights_only=True)["lora"]
    model, _ = load_gguf_model(str(base))
    from model.lora import weights_sha256

    assert settings["base"] == str(base) and settings["base_sha256"] == weights_sha256(model)
    run_script("sample.py", f"--out_dir={out}", "--prompt=note 7", "--max_new_tokens=4", "--device=cpu")


def test_a_sentencepiece_vocabulary_encodes_as_sentencepiece_does(tmp_path):
    """tokenizer.ggml.model = llama (Llama 2, TinyLlama): written as llama.cpp's converter writes a
    tokenizer.model's pieces, scores and types; our ids equal the sentencepiece library's own."""
    import io

    import sentencepiece as spm
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.splitlines()), model_writer=model_file,
                                   vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True, minloglevel=2,
                                   allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity")
    reference = spm.SentencePieceProcessor(model_proto=model_file.getvalue())
    ids = range(reference.vocab_size())
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([reference.IdToPiece(i) for i in ids])
    writer.add_token_scores([reference.GetScore(i) for i in ids])
    writer.add_token_types([gguf.TokenType.UNKNOWN if reference.IsUnknown(i) else gguf.TokenType.CONTROL
                            if reference.IsControl(i) else gguf.TokenType.BYTE if reference.IsByte(i)
                            else gguf.TokenType.NORMAL for i in ids])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_space_prefix(True)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))  # the tokenizer is read alone
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from model.gguf import load_gguf_tokenizer

    ours = load_gguf_tokenizer(str(tmp_path / "spm.gguf"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in (TEXT[:600], CHECK.replace("<|im_start|>", "").replace("<|im_end|>", ""), "  two spaces first"):
        assert ours.encode_prompt(text) == [1] + reference.encode(text)  # BOS first: llama.cpp's default
        assert ours.decode(ours.encode(text)) == text
        if not text.startswith(" "):  # transformers' GGUF tokenizer drops a leading space's own piece
            assert ours.encode_prompt(text) == theirs(text)["input_ids"]


def test_run_py_and_the_package_share_one_llama3_split_pattern():
    """run.py imports nothing of ours, so it keeps its own copy: the two must stay equal."""
    import run
    from model.tokenizer import LLAMA3_SPLIT_PATTERN

    assert run.LLAMA3_SPLIT_PATTERN == LLAMA3_SPLIT_PATTERN
