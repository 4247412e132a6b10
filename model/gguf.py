"""GGUF in and out: the file llama.cpp, ollama and LM Studio keep every model in.

A GGUF file is a header of key/value metadata (the architecture's sizes, the tokenizer's
vocabulary and merges, the chat template) followed by the tensors, each stored as float32,
float16 or in blocks of 4 to 8 bits with a scale per block. The `gguf` package, llama.cpp's own
Python reader and writer, parses it and turns any block type back into numbers
(gguf.quants.dequantize); this module only says which tensor is which of our parameters, which
metadata key is which of our config fields, and how the vocabulary becomes a tokenizer.json.

    load_gguf_model(path) -> (our GPT in float32 on the CPU, its tokenizer)
    save_gguf_model(model, tokenizer, path, quant) writes one that llama.cpp and transformers load

The names are llama.cpp's: token_embd, blk.N.attn_q / attn_k / attn_v (Llama) or attn_qkv
(GPT-2), attn_output, ffn_gate / ffn_up / ffn_down, attn_norm / ffn_norm, output_norm, output.
"""

import collections
import json
import os

import numpy as np
import torch

from model.errors import UserError
from model.files import atomic_write
from model.gpt import GPT, GPTConfig
from model.tokenizer import (GPT2_SPLIT_PATTERN, LLAMA3_SPLIT_PATTERN, HFTokenizer, byte_to_unicode,
                             split_rule_of, tokenizer_json)

ARCHS = ("llama", "gpt2")
# llama.cpp's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> the split rule each stands for, in
# run.py's names. llama.cpp cuts text by the same regular expressions for each group of names:
# GPT-2's pattern; every digit alone, then GPT-2's pattern (SmolLM, StarCoder); Llama 3's pattern.
SPLIT_RULE_OF_PRE = {"gpt-2": "gpt2", "smollm": "digits_gpt2", "starcoder": "digits_gpt2",
                     "refact": "digits_gpt2", "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3"}
# and the name each rule is written under
PRE_OF_SPLIT_RULE = {"gpt2": "gpt-2", "digits_gpt2": "smollm", "llama3": "llama-bpe"}


# ---- reading the file ------------------------------------------------------------------------

def open_gguf(path):
    """gguf's reader over the file (memory-mapped: tensors are read only when used)."""
    if not os.path.isfile(path):
        raise UserError(f"no GGUF file {path}")
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # a wrong magic number, a truncated header or tensor, an unknown type id...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable GGUF file: damaged, cut short or not GGUF at all ({reason})") from None


REQUIRED = object()


def metadata(reader, key, default=REQUIRED):
    """The value stored under `key` (a number, text, or a list of them)."""
    field = reader.fields.get(key)
    if field is None:
        if default is REQUIRED:
            raise UserError(f"the GGUF file has no {key} (required for this model)")
        return default
    return field.contents()


def gguf_config(reader) -> GPTConfig:
    """Our config from the file's metadata (keys as llama.cpp's converter writes them), refusing
    what our model would not compute exactly."""
    arch = metadata(reader, "general.architecture")
    if arch not in ARCHS:
        raise UserError(f"unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHS)})")
    key = lambda name, default=REQUIRED: metadata(reader, f"{arch}.{name}", default)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UserError("the GGUF file has no token_embd.weight tensor")
    # the embedding's rows are the vocabulary (GGUF lists the row length first)
    vocab_size = int(tensors["token_embd.weight"].shape[1])
    n_embd, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    common = dict(vocab_size=vocab_size, block_size=int(key("context_length")), n_layer=int(key("block_count")),
                  n_head=n_head, n_embd=n_embd, mlp_hidden=int(key("feed_forward_length")),
                  tie_embeddings="output.weight" not in tensors)
    try:
        if arch == "gpt2":
            return GPTConfig(arch="gpt2", norm_eps=float(key("attention.layer_norm_epsilon")), **common)
        head_size = int(key("attention.key_length", n_embd // n_head))
        rope_dims = int(key("rope.dimension_count", head_size))
        if rope_dims != head_size:
            raise UserError(f"rotary embeddings on {rope_dims} of {head_size} dimensions per head are not supported")
        scaling = metadata(reader, "llama.rope.scaling.type", "none")
        if scaling not in ("none", "") or "rope_freqs.weight" in tensors:
            raise UserError(f"unsupported rope scaling ({scaling if scaling != 'none' else 'rope_freqs.weight'}): "
                            "only plain RoPE is read from GGUF files")
        return GPTConfig(arch="llama", n_kv_head=int(key("attention.head_count_kv", n_head)), head_size=head_size,
                         norm_eps=float(key("attention.layer_norm_rms_epsilon")),
                         rope_theta=float(key("rope.freq_base", 10000.0)), **common)
    except ValueError as e:
        raise UserError(f"the GGUF metadata does not describe a model we can build: {e}") from None


def gguf_names(config: GPTConfig) -> dict:
    """Each of our parameters -> the GGUF tensor(s) it is made of (Llama's q, k and v are three
    tensors that we stack into c_attn's rows; GPT-2's are one, attn_qkv, as in our model)."""
    names = {"wte.weight": ["token_embd.weight"], "ln_f.weight": ["output_norm.weight"]}
    if config.arch == "gpt2":
        names["wpe.weight"] = ["position_embd.weight"]
        names["ln_f.bias"] = ["output_norm.bias"]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        parts = {"ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_proj": "attn_output",
                 "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
        if config.arch == "gpt2":
            parts["attn.c_attn"] = "attn_qkv"
            for layer, name in parts.items():
                names[ours + layer + ".weight"] = [theirs + name + ".weight"]
                names[ours + layer + ".bias"] = [theirs + name + ".bias"]
            continue
        parts["mlp.c_gate"] = "ffn_gate"
        for layer, name in parts.items():
            names[ours + layer + ".weight"] = [theirs + name + ".weight"]
        names[ours + "attn.c_attn.weight"] = [theirs + f"attn_{p}.weight" for p in "qkv"]
    if not config.tie_embeddings:
        names["lm_head.weight"] = ["output.weight"]
    return names


def rotary_rows_from_gguf(rows, n_heads):
    """Undo llama.cpp's reordering of a query or key matrix's rows, head by head.

    Rotary embeddings turn pairs of a head's dimensions. Hugging Face (and our apply_rope) pair
    dimension i with i + head_size/2; llama.cpp, like Meta's original Llama code, pairs
    neighbours 2i and 2i+1. Its converter therefore stores each head's rows in the order
    0, half, 1, half+1, ...; reading them back to 0, 1, ..., half-1, half, ... gives the same
    attention with our pairing. In the wrong order every head still works, but on mixed-up
    pairs: fluent-looking text that is subtly wrong, so the tests compare logits."""
    head_size = rows.shape[0] // n_heads
    return rows.reshape(n_heads, head_size // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def rotary_rows_to_gguf(rows, n_heads):
    """Our query or key rows in llama.cpp's order (the inverse of rotary_rows_from_gguf)."""
    head_size = rows.shape[0] // n_heads
    return rows.reshape(n_heads, 2, head_size // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


NUMBERS_PER_READ = 1 << 22  # a big tensor is read in slices of rows, about 16 MB of float32 each


TensorPlace = collections.namedtuple("TensorPlace", "name tensor_type shape data_offset n_bytes")


def tensor_shape(tensor):
    """(rows, row length) of a GGUF tensor (GGUF lists the row length first); a vector is one row."""
    dims = [int(n) for n in tensor.shape]
    return int(np.prod(dims[1:])), dims[0]


def tensor_rows(tensor, file, start, count):
    """Rows start..start+count of a tensor as float32 numbers, shape (count, row length).

    The bytes are read from the file, not through the reader's memory map: pages read through a
    map stay counted in the process's memory until it is closed, which would double the import's
    peak. gguf dequantizes any block type; a row always holds whole blocks."""
    from gguf import dequantize

    rows, row_length = tensor_shape(tensor)
    row_bytes = int(tensor.n_bytes) // rows
    file.seek(int(tensor.data_offset) + start * row_bytes)
    data = bytearray(count * row_bytes)  # writable, so torch can take float32 rows as they are
    if file.readinto(data) != len(data):
        raise UserError(f"tensor {tensor.name} is cut short: the file ends inside it (a truncated download?)")
    raw = np.frombuffer(data, dtype=np.uint8).reshape(count, row_bytes)
    try:
        values = dequantize(raw, tensor.tensor_type)
    except NotImplementedError:
        raise UserError(f"tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package "
                        "cannot dequantize") from None
    return np.asarray(values, dtype=np.float32).reshape(count, row_length)


def load_gguf_model(path: str):
    """(our GPT in float32 on the CPU, its tokenizer) from a GGUF file. Each tensor is
    dequantized on its own, a slice of rows at a time, straight into a model built without
    memory first, so importing needs little more memory than the float32 model itself."""
    reader = open_gguf(path)
    config = gguf_config(reader)
    tokenizer = gguf_tokenizer(reader)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"the GGUF vocabulary has {tokenizer.vocab_size} tokens but the embedding only "
                        f"{config.vocab_size} rows")
    tensors = {t.name: t for t in reader.tensors}
    names = gguf_names(config)
    # the reader's parsed metadata (a numpy array for every one of ~100,000 vocabulary strings) is
    # let go before the model takes its memory: only each tensor's place in the file is kept
    tensors = {name: TensorPlace(name, t.tensor_type, t.shape.tolist(), int(t.data_offset), int(t.n_bytes))
               for name, t in tensors.items()}
    del reader
    unknown = sorted(set(tensors) - {name for parts in names.values() for name in parts})
    if unknown:
        raise UserError(f"the GGUF file has tensors our {config.arch} model has no place for "
                        f"({', '.join(unknown[:4])}{', ...' if len(unknown) > 4 else ''})")
    model = GPT.uninitialised(config)
    params = dict(model.named_parameters())
    with open(path, "rb") as file, torch.no_grad():
        for ours, theirs in names.items():
            target = params[ours]
            rows_of = target.view(-1, target.shape[-1])  # a vector as one row, as GGUF stores it
            row = 0
            for name in theirs:
                if name not in tensors:
                    raise UserError(f"the GGUF file has no tensor {name}")
                rows, row_length = tensor_shape(tensors[name])
                if row_length != rows_of.shape[1] or row + rows > rows_of.shape[0]:
                    raise UserError(f"tensor {name} has {rows} rows of {row_length} numbers, which does not fit "
                                    f"{ours} of shape {tuple(target.shape)} that the metadata describes")
                if name.endswith(("attn_q.weight", "attn_k.weight")):  # whole heads at once
                    heads = config.n_head if "attn_q" in name else config.n_kv_head
                    values = rotary_rows_from_gguf(tensor_rows(tensors[name], file, 0, rows), heads)
                    rows_of[row:row + rows].copy_(torch.from_numpy(values))
                else:
                    step = max(1, NUMBERS_PER_READ // row_length)
                    for start in range(0, rows, step):
                        count = min(step, rows - start)
                        values = tensor_rows(tensors[name], file, start, count)
                        rows_of[row + start:row + start + count].copy_(torch.from_numpy(values))
                row += rows
            if row != rows_of.shape[0]:
                raise UserError(f"tensors {', '.join(theirs)} fill {row} of {ours}'s {rows_of.shape[0]} rows")
    return model.eval(), tokenizer


# ---- the tokenizer ------------------------------------------------------------------------------

def load_gguf_tokenizer(path: str) -> HFTokenizer:
    """A GGUF file's tokenizer alone (data preparation needs no weights)."""
    return gguf_tokenizer(open_gguf(path))


def gguf_tokenizer(reader) -> HFTokenizer:
    """The vocabulary in the metadata as a tokenizer.json, run by the `tokenizers` library."""
    model = metadata(reader, "tokenizer.ggml.model", None)
    if model is None:
        raise UserError("the GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
    tokens = list(metadata(reader, "tokenizer.ggml.tokens"))
    types = list(metadata(reader, "tokenizer.ggml.token_type", [NORMAL] * len(tokens)))
    bos_id, eos_id = (metadata(reader, f"tokenizer.ggml.{name}_token_id", None) for name in ("bos", "eos"))
    if model == "gpt2":
        spec = byte_level_bpe_json(tokens, types, list(metadata(reader, "tokenizer.ggml.merges", [])),
                                   metadata(reader, "tokenizer.ggml.pre", "default"))
        add_bos_default = False  # llama.cpp's default for byte-level BPE
    elif model == "llama":
        spec = sentencepiece_bpe_json(tokens, types, list(metadata(reader, "tokenizer.ggml.scores", [])),
                                      bool(metadata(reader, "tokenizer.ggml.add_space_prefix", True)))
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    else:
        raise UserError(f"unsupported GGUF tokenizer {model!r} (supported: gpt2 byte-level BPE, llama SentencePiece)")
    add_bos = bool(metadata(reader, "tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(metadata(reader, "tokenizer.ggml.add_eos_token", False))
    for name, id in (("bos", bos_id), ("eos", eos_id)):
        if id is not None and not 0 <= id < len(tokens):
            raise UserError(f"tokenizer.ggml.{name}_token_id {id} is not one of the {len(tokens)} tokens")
    added = ([f"{tokens[bos_id]}:0"] if add_bos and bos_id is not None else []) + ["$A:0"] + \
        ([f"{tokens[eos_id]}:0"] if add_eos and eos_id is not None else [])
    if len(added) > 1:  # the post-processor puts BOS (and EOS) around every encoded prompt
        special = {tokens[i]: i for i in (bos_id if add_bos else None, eos_id if add_eos else None) if i is not None}
        spec["post_processor"] = {"type": "TemplateProcessing",
                                  "single": [template_piece(p) for p in added],
                                  "pair": [template_piece(p) for p in added] + [template_piece("$B:1")],
                                  "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in special.items()}}
    chat_template = metadata(reader, "tokenizer.chat_template", None)
    return HFTokenizer(json.dumps(spec), bos_id, eos_id, chat_template)


def template_piece(text):
    """TemplateProcessing's JSON for one piece: "$A:0" (the text) or "<s>:0" (a special token)."""
    name, type_id = text.rsplit(":", 1)
    if name in ("$A", "$B"):
        return {"Sequence": {"id": name[1], "type_id": int(type_id)}}
    return {"SpecialToken": {"id": name, "type_id": int(type_id)}}


def added_tokens(tokens, types):
    """Control tokens (<|im_start|>) as special added tokens and user-defined ones as plain added
    tokens: both are matched whole in the text, as llama.cpp does, never cut into pieces."""
    return [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": kind == CONTROL}
            for i, (token, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)]


def byte_level_bpe_json(tokens, types, merges, pre):
    """tokenizer.json of a byte-level BPE (GPT-2's kind: every byte is a printable character and
    merges join them), split into chunks first by the rule its pre-tokenizer name stands for."""
    rule = SPLIT_RULE_OF_PRE.get(pre)
    if rule is None:
        raise UserError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: {', '.join(SPLIT_RULE_OF_PRE)})")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if rule == "gpt2":
        pre_tokenizer = byte_level
    elif rule == "digits_gpt2":
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    else:
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
            {**byte_level, "use_regex": False}]}
    # a plain token spelled outside the byte alphabet (some converters store raw text) is respelled
    alphabet, spelling = set(byte_to_unicode().values()), byte_to_unicode()
    vocab = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind == NORMAL and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens(tokens, types),
            "normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      # Llama 3's tokenizer takes a chunk whole when it is a token itself
                      "ignore_merges": rule == "llama3",
                      "vocab": vocab, "merges": [m.split(" ", 1) for m in merges]}}


def sentencepiece_bpe_json(tokens, types, scores, add_space_prefix):
    """tokenizer.json of a SentencePiece BPE vocabulary (Llama 2, TinyLlama): spaces are written
    '▁', a space is put before the text, and of all adjacent pairs the one whose joined token
    scores highest merges first; bytes without a token of their own become <0xNN> tokens.
    Merges ordered by the score of the token they make give exactly that order."""
    if len(scores) != len(tokens):
        raise UserError("the GGUF SentencePiece vocabulary has no scores (tokenizer.ggml.scores)")
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    mergeable = {token: i for token, i in vocab.items() if types[i] in (NORMAL, USER_DEFINED)}
    merges = []
    for token in sorted(mergeable, key=lambda t: (-scores[vocab[t]], vocab[t])):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))
                 if token[:i] in mergeable and token[i:] in mergeable]
        merges += sorted(pairs, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    unk = next((tokens[i] for i, kind in enumerate(types) if kind == UNKNOWN), None)
    normalizers = ([{"type": "Prepend", "prepend": "\u2581"}] if add_space_prefix else []) + \
        [{"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if add_space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens(tokens, types),
            "normalizer": {"type": "Sequence", "normalizers": normalizers}, "pre_tokenizer": None,
            "post_processor": None, "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                      "vocab": vocab, "merges": [list(pair) for pair in merges]}}


# ---- writing a GGUF file ---------------------------------------------------------------------

QUANTS = ("f32", "f16", "q8_0", "q4_0")


def gguf_vocab(tokenizer, vocab_size):
    """(tokens, token types, merges, pre-tokenizer name, add_bos) of our tokenizer as a GGUF
    byte-level BPE vocabulary of exactly vocab_size tokens (spare embedding rows become unused
    [PADn] tokens, as llama.cpp's converter writes them)."""
    if tokenizer.kind == "char":
        # one token per character would need a byte-level vocabulary without merges, but llama.cpp
        # refuses a file without tokenizer.ggml.merges and the gguf package writes no empty list
        raise UserError("a character tokenizer cannot be written as a GGUF vocabulary (llama.cpp's byte-level "
                        "vocabularies need merges, and a character vocabulary has none): prepare the data with "
                        "--tokenizer=bpe (or gpt2) to export the model as GGUF")
    spec = tokenizer_json(tokenizer)  # bpe and gpt2 kinds as a tokenizer.json too
    model = spec.get("model") or {}
    if tokenizer.kind in ("bpe", "gpt2"):
        rule = "gpt2" if tokenizer.pattern == GPT2_SPLIT_PATTERN else None
    else:
        rule = split_rule_of(spec.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or rule is None or spec.get("normalizer"):
        raise UserError(f"GGUF export writes byte-level BPE vocabularies split as GPT-2, SmolLM2 or Llama 3 split "
                        f"text; this tokenizer is a {model.get('type')} model with another pre-tokenizer or a normalizer")
    vocab = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED] * vocab_size
    for token, i in vocab.items():
        if i < vocab_size:
            tokens[i], types[i] = token, NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = CONTROL if added["special"] else USER_DEFINED
    add_bos = False
    if tokenizer.kind == "hf":  # a post-processor that puts BOS before every prompt
        plain, full = tokenizer.encode("a"), tokenizer.encode_prompt("a")
        add_bos = full != plain
        if add_bos and full != [tokenizer.bos_id] + plain:
            raise UserError("GGUF files can say that prompts start with BOS, but this tokenizer adds other tokens")
    return tokens, types, merges, PRE_OF_SPLIT_RULE[rule], add_bos


def check_exportable(model):
    c = model.config
    default_activation = "gelu" if c.arch == "gpt2" else "swiglu"
    if c.qk_norm or c.logit_softcap or c.mlp_activation != default_activation:
        raise UserError("llama.cpp's gpt2 and llama architectures have no qk_norm, logit_softcap or "
                        f"{c.mlp_activation} MLP: this model can be exported for run.py (--format=bin), not as gguf")
    if c.rope_scaling:
        raise UserError("GGUF export writes plain RoPE; this model's llama3 rope scaling is not supported")
    if c.arch == "gpt2" and (not c.tie_embeddings or c.n_kv_head != c.n_head or c.head_size * c.n_head != c.n_embd):
        raise UserError("llama.cpp's gpt2 needs tied embeddings, n_kv_head = n_head and head_size = n_embd / n_head")


def gguf_tensors(model):
    """(GGUF name, float32 numbers) of every tensor, in llama.cpp's names and layouts."""
    c = model.config
    state = model.state_dict()
    for ours, theirs in gguf_names(c).items():
        values = state[ours].detach().to(torch.float32).cpu().numpy()
        if ours in ("wte.weight", "lm_head.weight"):
            values = values[:c.vocab_size]  # padded rows exist only for fast matmuls
        if len(theirs) == 1:
            yield theirs[0], values
            continue
        q, k, v = np.split(values, [c.n_head * c.head_size, (c.n_head + c.n_kv_head) * c.head_size])
        # llama.cpp pairs neighbouring dimensions in RoPE: see rotary_rows_from_gguf
        yield theirs[0], rotary_rows_to_gguf(q, c.n_head)
        yield theirs[1], rotary_rows_to_gguf(k, c.n_kv_head)
        yield theirs[2], v


def save_gguf_model(model, tokenizer, path, quant="f32"):
    """Write the model as a GGUF file with the metadata llama.cpp's converter writes. quant: f32,
    f16 (matrices as float16), q8_0 or q4_0 (matrices in blocks of 32 numbers sharing one scale,
    8 or 4 bits each); vectors (norms, biases) stay float32, as llama.cpp keeps them."""
    import gguf

    quant = quant or "f32"
    if quant not in QUANTS:
        raise UserError(f"--quant must be one of {', '.join(QUANTS)} for GGUF, not {quant!r}")
    check_exportable(model)
    c = model.config
    if tokenizer.vocab_size > c.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {c.vocab_size}")
    tokens, types, merges, pre, add_bos = gguf_vocab(tokenizer, c.vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    block_type = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(quant)
    with atomic_write(path) as f:
        writer = gguf.GGUFWriter(f.name, c.arch)  # the writer opens the temporary file by name itself
        writer.add_name(os.path.splitext(os.path.basename(path))[0])
        writer.add_file_type(file_types[quant])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_block_count(c.n_layer)
        writer.add_context_length(c.block_size)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(c.mlp_hidden)
        writer.add_head_count(c.n_head)
        if c.arch == "gpt2":
            writer.add_layer_norm_eps(c.norm_eps)
        else:
            writer.add_head_count_kv(c.n_kv_head)
            writer.add_rope_freq_base(c.rope_theta)
            writer.add_layer_norm_rms_eps(c.norm_eps)
            writer.add_vocab_size(c.vocab_size)
            writer.add_rope_dimension_count(c.head_size)
            writer.add_key_length(c.head_size)
            writer.add_value_length(c.head_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        if tokenizer.bos_id is not None:
            writer.add_bos_token_id(tokenizer.bos_id)
        if tokenizer.eos_id is not None:
            writer.add_eos_token_id(tokenizer.eos_id)
        writer.add_add_bos_token(add_bos)
        if tokenizer.chat_template:
            writer.add_chat_template(tokenizer.chat_template)
        for name, values in gguf_tensors(model):
            if values.ndim == 1 or quant == "f32":
                writer.add_tensor(name, values)
            elif block_type is None or values.shape[-1] % 32:  # rows that are no whole number of blocks
                writer.add_tensor(name, values.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(values, block_type), raw_dtype=block_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
