"""Run a language model with numpy alone: the parameters file written by export.py, and this.

    python run.py out/model.bin --prompt="def main(" --max_new_tokens=200 --temperature=0.8

A language model is a file of numbers and a short program that multiplies your input by
them. This is that program: the forward pass of model/gpt.py written out in plain numpy,
reading the numbers straight from the file (memory-mapped: nothing is copied until used).
It imports only numpy and the standard library, so this one file and model.bin are all a
machine needs. The file format is laid out byte by byte in README.md.
"""

import time

STARTED = time.perf_counter()  # before importing numpy: time to first token counts the whole start-up

import argparse
import codecs
import math
import os
import re
import struct
import sys
import unicodedata
from dataclasses import dataclass

import numpy as np

MAGIC, VERSION = b"GPTMODEL", 2  # version 1 files (before grouped-query attention) still load
VERSION_8BIT = 3  # version 2's layout with every matrix as int8 groups and float16 scales
GROUP_SIZE = 32  # numbers per scale in a version 3 file (llama.cpp's Q8_0 block)
ARCHS, TOKENIZER_KINDS, ACTIVATIONS = ("gpt2", "llama"), ("char", "bpe", "gpt2", "hf"), ("gelu", "swiglu", "relu2")
# after magic and version: arch, vocab_size, block_size, n_layer, n_head, n_kv_head, n_embd, head_size,
# mlp_hidden, tie_embeddings, mlp_activation, qk_norm, norm_eps, logit_softcap
HEADER = struct.Struct("<8s13I2f")
# version 1: arch, vocab_size, block_size, n_layer, n_head, n_embd, mlp_hidden, norm_eps, rope_theta
HEADER_V1 = struct.Struct("<8s8I2f")

# The pre-split rules: a text is cut into chunks by each pattern in turn (each piece of one
# stage is cut again by the next), and BPE merges never cross a chunk boundary.
# GPT-2's: contractions, letters, numbers, other symbols, and whitespace runs.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 first isolates every single digit, then applies GPT-2's pattern.
DIGITS_SPLIT_PATTERN = r"""\p{N}|[^\p{N}]+"""
# Llama 3's: case-insensitive contractions, a letter run with one leading non-letter, at most 3 digits.
LLAMA3_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                        r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPLIT_RULES = {"gpt2": [GPT2_SPLIT_PATTERN], "digits_gpt2": [DIGITS_SPLIT_PATTERN, GPT2_SPLIT_PATTERN],
               "llama3": [LLAMA3_SPLIT_PATTERN]}


class BadInput(Exception):
    """A model file or a prompt we cannot use: reported as one line, exit code 2."""


@dataclass
class Config:
    arch: str
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int  # query heads
    n_kv_head: int  # key/value heads: query head h uses key/value head h // (n_head // n_kv_head)
    n_embd: int
    head_size: int
    mlp_hidden: int
    tie_embeddings: bool  # True: the token embedding is also the output layer
    mlp_activation: str  # gelu (GPT-2), swiglu (Llama) or relu2
    qk_norm: bool  # True: each head's queries and keys are RMS-normalised before RoPE
    norm_eps: float
    logit_softcap: float  # > 0: logits = softcap * tanh(logits / softcap)


def weight_layout(config, version=VERSION):
    """(name, shape) of every tensor, in file order. The names are model/gpt.py's; matrices
    are stored as (out, in), like torch's nn.Linear, so a layer computes x @ W.T + b."""
    C, H, has_bias = config.n_embd, config.mlp_hidden, config.arch == "gpt2"
    q_size, kv_size = config.n_head * config.head_size, config.n_kv_head * config.head_size

    def norm(name):
        return [(name + ".weight", (C,))] + ([(name + ".bias", (C,))] if has_bias else [])

    def linear(name, n_out, n_in):
        return [(name + ".weight", (n_out, n_in))] + ([(name + ".bias", (n_out,))] if has_bias else [])

    layout = [("wte.weight", (config.vocab_size, C))]  # token embedding
    if config.arch == "gpt2":
        layout.append(("wpe.weight", (config.block_size, C)))  # learned position embedding
    elif version >= 2:
        layout.append(("rope.inv_freq", (config.head_size // 2,)))  # RoPE: radians per position, per pair
    for i in range(config.n_layer):
        b = f"blocks.{i}."
        layout += norm(b + "ln_1") + linear(b + "attn.c_attn", q_size + 2 * kv_size, C)
        layout += linear(b + "attn.c_proj", C, q_size) + norm(b + "ln_2")
        if config.mlp_activation == "swiglu":
            layout += linear(b + "mlp.c_gate", H, C)
        layout += linear(b + "mlp.c_fc", H, C) + linear(b + "mlp.c_proj", C, H)
    layout += norm("ln_f")
    if not config.tie_embeddings:
        layout.append(("lm_head.weight", (config.vocab_size, C)))  # an output layer of its own
    return layout


def stored_bytes(shape, version=VERSION):
    """Bytes a tensor takes in the file: float32, or in version 3 a matrix's int8 values plus a
    float16 scale per group of GROUP_SIZE numbers of a row."""
    count = math.prod(shape)
    if version == VERSION_8BIT and len(shape) == 2:
        return count + 2 * (count // GROUP_SIZE)
    return 4 * count


# ---- the tokenizer ---------------------------------------------------------------------------

class Tokenizer:
    """char: one id per character. Byte-level BPE (bpe, gpt2, hf): cut the text into chunks
    (split_rule), then merge each chunk's bytes pair by pair. Which pair merges first: with a
    merge list, the pair listed earliest (Hugging Face's tokenizers); without one, the pair
    whose joined bytes have the lowest id (tiktoken's rule: an id is its merge rank)."""

    def __init__(self, kind, token_bytes, eos_id=None, bos_id=None, prompt_starts_with_bos=False,
                 split_rule="", whole_chunk_first=True, merges=()):
        self.kind, self.token_bytes, self.eos_id, self.bos_id = kind, token_bytes, eos_id, bos_id
        self.prompt_starts_with_bos, self.split_rule = prompt_starts_with_bos, split_rule
        self.whole_chunk_first = whole_chunk_first
        if kind == "char":
            self.id_of = {b.decode("utf-8", "surrogatepass"): i for i, b in enumerate(token_bytes)}
            return
        self.id_of = {}
        for i, b in enumerate(token_bytes):
            if b and i not in (eos_id, bos_id):  # special tokens are never the result of a merge
                self.id_of.setdefault(b, i)
        self.merge_rank = {(token_bytes[a], token_bytes[b]): rank for rank, (a, b) in enumerate(merges)} or None

    def encode(self, text):
        if self.kind == "char":
            unknown = next((ch for ch in text if ch not in self.id_of), None)
            if unknown is not None:
                raise BadInput(f"character {unknown!r} (U+{ord(unknown):04X}) is not in the character vocabulary")
            return [self.id_of[ch] for ch in text]
        # lone surrogates cannot be UTF-8 encoded; like tiktoken, read them as U+FFFD
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return [i for chunk in split(text, self.split_rule) for i in self.merge(chunk.encode("utf-8"))]

    def encode_prompt(self, text):
        """The ids a prompt becomes: with the tokenizer's start-of-text token where it adds one (Llama 3)."""
        return ([self.bos_id] if self.prompt_starts_with_bos else []) + self.encode(text)

    def pair_rank(self, a, b):
        if self.merge_rank is None:
            return self.id_of.get(a + b, math.inf)
        return self.merge_rank.get((a, b), math.inf)

    def merge(self, chunk):
        """Byte-pair merge: start from single bytes and keep joining the adjacent pair of the
        lowest rank (the leftmost of equals), until no adjacent pair can merge."""
        if self.whole_chunk_first and chunk in self.id_of:
            return [self.id_of[chunk]]
        parts = [chunk[i:i + 1] for i in range(len(chunk))]
        while len(parts) > 1:
            pair_ranks = [self.pair_rank(a, b) for a, b in zip(parts, parts[1:])]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)  # leftmost lowest
            if pair_ranks[best] == math.inf:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        return [self.id_of[part] for part in parts]


# The split patterns need Unicode classes (\p{L} letters, \p{N} numbers) that Python's `re`
# lacks. So we run each pattern on a stand-in string of the same length, in which every
# non-ASCII character is replaced by an ASCII one of its class: letters by "a", numbers by
# "0", whitespace by "\t" (not " ", "\r" or "\n": the patterns treat those specially), anything
# else by "#"; and the pattern's \p{L} and \p{N} become A-Za-z and 0-9. The chunk boundaries
# are then exactly those of the original text. One letter needs care: Llama 3's contractions
# ignore case, and the long s (U+017F) is a case variant of "s", so it stands in as "S".
def _ascii_stand_in(ch):
    if ch < "\x80":
        return ch
    if ch == "\u017f":
        return "S"
    category = unicodedata.category(ch)
    if category[0] in "LN":
        return "a" if category[0] == "L" else "0"
    # Unicode's White_Space beyond ASCII: the space separators, line/paragraph separators, NEL
    return "\t" if category in ("Zs", "Zl", "Zp") or ch == "\x85" else "#"


def ascii_pattern(pattern):
    """The pattern for the stand-in text: \\p{L} -> A-Za-z and \\p{N} -> 0-9, inside brackets or alone."""
    classes = {"L": "A-Za-z", "N": "0-9"}

    def replace(match):
        if match.group(1):  # \p{X} on its own
            return f"[{classes[match.group(1)]}]"
        return re.sub(r"\\p\{([LN])\}", lambda m: classes[m.group(1)], match.group(0))  # inside [...]

    return re.compile(re.sub(r"\\p\{([LN])\}|\[[^\]]*\]", replace, pattern), re.ASCII)


_ASCII_SPLITS = {rule: [ascii_pattern(p) for p in patterns] for rule, patterns in SPLIT_RULES.items()}


def split(text, rule="gpt2"):
    """Cut text into chunks by each of the rule's patterns in turn."""
    pieces = [text]
    for pattern in _ASCII_SPLITS[rule]:
        pieces = [piece[m.start():m.end()] for piece in pieces
                  for m in pattern.finditer("".join(map(_ascii_stand_in, piece)))]
    return pieces


# ---- reading the file --------------------------------------------------------------------------

@dataclass
class Model:
    """The numbers of one model: its config, its tokenizer and its weights (name -> array)."""
    config: Config
    tokenizer: "Tokenizer"
    weights: dict
    version: int = VERSION  # the file's format version (3: the matrices were stored in 8 bits)


def load_model(path):
    if not os.path.isfile(path):
        raise BadInput(f"no model file at {path} (write one with: python export.py --out_dir=out)")
    with open(path, "rb") as f:
        magic, size = f.read(len(MAGIC)), os.fstat(f.fileno()).st_size
    if magic != MAGIC or size < HEADER_V1.size:
        raise BadInput(f"{path} is not a model file (it does not start with {MAGIC.decode()}; see export.py)")
    data = np.memmap(path, dtype=np.uint8, mode="r")  # the file's bytes, read from disk as they are used
    position = len(MAGIC)

    def read(fmt):  # the next little-endian values, never past the end of the file
        nonlocal position
        if position + struct.calcsize(fmt) > size:
            raise BadInput(f"{path} is truncated (it ends inside the tokenizer)")
        values = struct.unpack_from(fmt, data, position)
        position += struct.calcsize(fmt)
        return values

    def read_string():  # a u32 byte count, then the bytes
        return read(f"<{read('<I')[0]}s")[0]

    (version,) = read("<I")
    if version not in (1, VERSION, VERSION_8BIT):
        raise BadInput(f"{path} has format version {version}; this run.py reads versions 1, {VERSION} "
                       f"and {VERSION_8BIT}")
    if version == 1:  # every head is a key/value head, head_size = n_embd / n_head, tied embeddings
        arch, vocab_size, block_size, n_layer, n_head, n_embd, mlp_hidden, norm_eps, rope_theta = read("<7I2f")
        sizes = [vocab_size, block_size, n_layer, n_head, n_head, n_embd, n_embd // n_head if n_head else 0, mlp_hidden]
        tied, activation, qk_norm, softcap = 1, arch, 0, 0.0  # gelu for gpt2, swiglu for llama
    else:
        arch, *sizes, tied, activation, qk_norm, norm_eps, softcap = read("<12I2f")
    impossible = BadInput(f"{path} is corrupt (impossible model sizes in its header)")
    if arch >= len(ARCHS) or min(sizes) == 0 or tied > 1 or activation >= len(ACTIVATIONS) or qk_norm > 1:
        raise impossible
    config = Config(ARCHS[arch], *sizes, bool(tied), ACTIVATIONS[activation], bool(qk_norm), norm_eps, softcap)
    if config.n_head % config.n_kv_head or (config.arch == "llama" and config.head_size % 2):
        raise impossible
    if version == 1 and config.n_embd % config.n_head:
        raise impossible

    if version == 1:
        (kind, eos_id), bos_id, starts_with_bos = read("<Ii"), -1, 0
        split_rule = "gpt2" if read_string() == GPT2_SPLIT_PATTERN.encode() else "unknown"
        whole_chunk_first = 1
    else:
        kind, bos_id, eos_id, starts_with_bos = read("<IiiI")
        split_rule, (whole_chunk_first,) = read_string().decode("utf-8", "replace"), read("<I")
    (n_tokens,) = read("<I")
    token_bytes = [read_string() for _ in range(n_tokens)]
    merges = []
    if version > 1:
        (n_merges,) = read("<I")
        merges = np.array(read(f"<{2 * n_merges}I"), dtype=np.int64).reshape(n_merges, 2)
        if merges.size and merges.max() >= n_tokens:
            raise BadInput(f"{path} is corrupt (its merge list names tokens it does not have)")
        merges = merges.tolist()
    if (kind >= len(TOKENIZER_KINDS) or n_tokens != config.vocab_size or not -1 <= eos_id < n_tokens
            or not -1 <= bos_id < n_tokens or (starts_with_bos and bos_id < 0)):
        raise BadInput(f"{path} is corrupt (its tokenizer does not fit the model)")
    if kind > 0 and split_rule not in SPLIT_RULES:
        raise BadInput(f"{path} splits text by a rule this run.py does not know ({split_rule!r}; "
                       f"it knows {', '.join(SPLIT_RULES)})")
    try:
        tokenizer = Tokenizer(TOKENIZER_KINDS[kind], token_bytes, eos_id if eos_id >= 0 else None,
                              bos_id if bos_id >= 0 else None, bool(starts_with_bos), split_rule,
                              bool(whole_chunk_first), merges)
    except UnicodeDecodeError:  # a char token that is not UTF-8
        raise BadInput(f"{path} is corrupt (a character token is not UTF-8)") from None

    position = (position + 63) // 64 * 64  # the weights start 64-byte aligned
    layout = weight_layout(config, version)
    if version == VERSION_8BIT and any(len(shape) == 2 and shape[1] % GROUP_SIZE for _, shape in layout):
        raise impossible  # export.py writes 8 bits only for rows that are whole groups
    expected = position + sum(stored_bytes(shape, version) for _, shape in layout)
    if size != expected:
        raise BadInput(f"{path} has {size:,} bytes but its header promises {expected:,} (truncated or corrupt)")
    weights = {}
    for name, shape in layout:
        if version == VERSION_8BIT and len(shape) == 2:
            # int8 values, then one float16 scale per group (export.py gives a row's groups one scale,
            # the row's: the numbers sample.py --quant=q8_0 runs with; any scales read the same way):
            # the float32 matrix is rebuilt here, once
            # (measured faster than rebuilding each matrix whenever it multiplies; see docs/model-bin.md)
            rows, cols = shape
            values = np.frombuffer(data, dtype=np.int8, count=rows * cols, offset=position)
            scales = np.frombuffer(data, dtype="<f2", count=rows * cols // GROUP_SIZE, offset=position + rows * cols)
            groups = (values.reshape(rows, cols // GROUP_SIZE, GROUP_SIZE)
                      * scales.astype(np.float32).reshape(rows, cols // GROUP_SIZE, 1))
            weights[name] = groups.reshape(rows, cols)
        else:  # float32: a view into the memory-mapped file, not a copy
            weights[name] = np.frombuffer(data, dtype="<f4", count=math.prod(shape), offset=position).reshape(shape)
        position += stored_bytes(shape, version)
    if version == 1 and config.arch == "llama":  # version 1 stored rope_theta, not the frequencies
        half = config.head_size // 2
        weights["rope.inv_freq"] = 1.0 / (rope_theta ** (np.arange(half, dtype=np.float32) / half))
    return Model(config, tokenizer, weights, version)


# ---- the forward pass ---------------------------------------------------------------------------
# Every array is float32, as in torch. (Python numbers keep it so; numpy's float64 would not.)

def linear(model, name, x):
    y = x @ model.weights[name + ".weight"].T
    bias = model.weights.get(name + ".bias")
    return y if bias is None else y + bias


def norm(model, name, x):
    eps, weight = model.config.norm_eps, model.weights[name + ".weight"]
    if model.config.arch == "gpt2":  # LayerNorm: zero mean, unit variance, then scale and shift
        mean = x.mean(-1, keepdims=True)
        variance = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(variance + eps) * weight + model.weights[name + ".bias"]
    # RMSNorm: unit root-mean-square, then scale (no mean, no bias)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))  # minus the max: same result, no overflow
    return e / e.sum(-1, keepdims=True)


def rotate(x, cos, sin):
    """RoPE: turn each pair (x[i], x[i + half]) by its position's angle."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class KVCache:
    """Keys and values of every position so far, per layer: each new token then computes only
    its own. It grows as needed (doubling), since real models allow contexts of 100k+ tokens."""

    def __init__(self, config):
        self.block_size = config.block_size
        self.keys = self.values = np.zeros((config.n_layer, config.n_kv_head, 0, config.head_size), np.float32)
        self.length = 0

    def make_room(self, end):
        if end > self.keys.shape[2]:
            room = min(self.block_size, max(end, 2 * self.keys.shape[2]))
            grow = [(0, 0), (0, 0), (0, room - self.keys.shape[2]), (0, 0)]
            self.keys, self.values = np.pad(self.keys, grow), np.pad(self.values, grow)


def attention(model, b, layer, x, cache, start):
    c = model.config
    T = len(x)
    q_size, kv_size = c.n_head * c.head_size, c.n_kv_head * c.head_size
    q, k, v = np.split(linear(model, b + "attn.c_attn", x), [q_size, q_size + kv_size], axis=-1)
    # (T, heads * head_size) -> (heads, T, head_size): each head attends on its own slice of the vector
    q = q.reshape(T, c.n_head, c.head_size).transpose(1, 0, 2)
    k, v = (t.reshape(T, c.n_kv_head, c.head_size).transpose(1, 0, 2) for t in (k, v))
    if c.qk_norm:  # unit root-mean-square queries and keys (RMSNorm without a weight)
        q, k = (t / np.sqrt((t * t).mean(-1, keepdims=True) + c.norm_eps) for t in (q, k))
    if c.arch == "llama":  # RoPE: rotate by angle position * frequency, one frequency per pair
        angles = np.outer(np.arange(start, start + T, dtype=np.float32), model.weights["rope.inv_freq"])
        q, k = rotate(q, np.cos(angles), np.sin(angles)), rotate(k, np.cos(angles), np.sin(angles))
    cache.keys[layer, :, start:start + T], cache.values[layer, :, start:start + T] = k, v
    k, v = cache.keys[layer, :, :start + T], cache.values[layer, :, :start + T]
    if c.n_kv_head != c.n_head:  # grouped-query attention: query head h uses key/value head h // group
        group = c.n_head // c.n_kv_head
        k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(c.head_size)  # (n_head, T, start + T)
    # query i sits at position start + i and may only look at keys up to there
    future = np.arange(start + T)[None, :] > np.arange(start, start + T)[:, None]
    y = softmax(np.where(future, -np.inf, scores)) @ v
    return linear(model, b + "attn.c_proj", y.transpose(1, 0, 2).reshape(T, q_size))


def mlp(model, b, x):
    activation = model.config.mlp_activation
    if activation == "gelu":  # GPT-2's tanh approximation
        h = linear(model, b + "mlp.c_fc", x)
        h = 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))
    elif activation == "relu2":  # ReLU squared
        h = np.maximum(linear(model, b + "mlp.c_fc", x), 0) ** 2
    else:  # SwiGLU: silu(x c_gate) * (x c_fc), silu(a) = a * sigmoid(a), sigmoid(a) = (1 + tanh(a/2)) / 2
        gate = linear(model, b + "mlp.c_gate", x)
        h = gate * 0.5 * (1.0 + np.tanh(0.5 * gate)) * linear(model, b + "mlp.c_fc", x)
    return linear(model, b + "mlp.c_proj", h)


def forward(model, ids, cache):
    """Token ids that continue where the cache ends -> logits (len(ids), vocab_size)."""
    c, w, start = model.config, model.weights, cache.length
    cache.make_room(start + len(ids))
    x = w["wte.weight"][ids]  # one row of the embedding per token
    if c.arch == "gpt2":
        x = x + w["wpe.weight"][start:start + len(ids)]
    for layer in range(c.n_layer):  # pre-norm residual blocks
        b = f"blocks.{layer}."
        x = x + attention(model, b, layer, norm(model, b + "ln_1", x), cache, start)
        x = x + mlp(model, b, norm(model, b + "ln_2", x))
    cache.length += len(ids)
    output = w["wte.weight" if c.tie_embeddings else "lm_head.weight"]  # tied: the embedding scores tokens
    logits = norm(model, "ln_f", x) @ output.T
    if c.logit_softcap:  # a smooth ceiling: large scores bend towards +-softcap
        logits = c.logit_softcap * np.tanh(logits / c.logit_softcap)
    return logits


def logits_of(model, ids):
    """Logits at every position of a sequence (at most block_size ids), from an empty cache."""
    return forward(model, list(ids), KVCache(model.config))


# ---- generation --------------------------------------------------------------------------------

def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """As in model/gpt.py: logits / temperature, then -inf for every token outside the top_k
    and outside the smallest set whose probability reaches top_p."""
    logits = logits.astype(np.float32) / max(temperature, 1e-8)
    if top_k is not None and 0 < top_k < len(logits):  # ties with the k-th value stay in
        logits = np.where(logits < np.sort(logits)[-top_k], -np.inf, logits)
    if top_p is not None and 0.0 < top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        probs = softmax(logits[order])
        # drop a token when the tokens ranked before it already reach top_p (the first stays)
        logits[order[np.cumsum(probs) - probs >= top_p]] = -np.inf
    return logits


def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """One id from a vector of logits; temperature 0 means greedy (the argmax)."""
    if temperature == 0:
        return int(np.argmax(logits))
    cumulative = np.cumsum(softmax(filter_logits(logits, temperature, top_k, top_p)).astype(np.float64))
    # the first id whose cumulative probability passes a uniform draw (ids of probability 0 never do)
    return min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(logits) - 1)


def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, seed=None):
    """Yield new token ids one at a time. As in model/gpt.py: the prompt is cropped to the
    context, and once the cache is full it restarts from the last block_size // 2 tokens."""
    block_size = model.config.block_size
    tokens = [int(i) for i in prompt_ids][-block_size:]
    if not tokens:
        raise ValueError("generate needs at least one prompt token")
    rng = np.random.default_rng(seed)  # numpy's generator: same seed, same text
    cache = KVCache(model.config)
    logits = forward(model, tokens, cache)
    for _ in range(max_new_tokens):
        next_id = sample_next_token(logits[-1], rng, temperature, top_k, top_p)
        yield next_id
        if next_id == eos_id:
            return
        tokens.append(next_id)
        if cache.length < block_size:
            logits = forward(model, [next_id], cache)
        else:
            cache.length = 0
            logits = forward(model, tokens[-(block_size // 2):], cache)


# ---- the command line ----------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, like every script here
        raise BadInput(message)


def read_prompt(prompt, tokenizer):
    """As sample.py: text or FILE:path; '' starts a fresh document (start- or end-of-text, or a newline)."""
    if prompt.startswith("FILE:"):
        try:
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"cannot read prompt file {prompt[5:]}: {getattr(e, 'strerror', None) or e}") from None
    if not prompt and tokenizer.prompt_starts_with_bos:
        return [tokenizer.bos_id], ""
    if not prompt and tokenizer.eos_id is not None:
        return [tokenizer.eos_id], ""
    prompt = prompt or "\n"
    return tokenizer.encode_prompt(prompt), prompt


def main(argv=None):
    parser = ArgumentParser(description="Generate text from a model.bin with numpy alone.",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", nargs="?", default="out/model.bin", help="file written by export.py")
    parser.add_argument("--prompt", default="", help="text to continue, or FILE:path")
    parser.add_argument("--max_new_tokens", type=int, default=500, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="0 = all tokens")
    parser.add_argument("--top_p", type=float, default=1.0, help="1 = all tokens")
    parser.add_argument("--seed", type=int, default=1337, help="same seed, same text")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0 or not 0.0 < args.top_p <= 1.0:
        raise BadInput("need --max_new_tokens >= 0, --temperature >= 0, --top_k >= 0 and --top_p in (0, 1]")
    model = load_model(args.model)
    tokenizer = model.tokenizer
    prompt_ids, prompt_text = read_prompt(args.prompt, tokenizer)
    n_params, block_size = sum(w.size for w in model.weights.values()), model.config.block_size
    stored = ", stored in 8 bits" if model.version == VERSION_8BIT else ""
    print(f"model: {model.config.arch}, {n_params:,} parameters{stored}, {tokenizer.kind} tokenizer; prompt: "
          f"{len(prompt_ids)} tokens" + (f" (cropped to the last {block_size})" if len(prompt_ids) > block_size else ""),
          file=sys.stderr)
    sys.stdout.write(prompt_text)
    # a token can end inside a UTF-8 character; the incremental decoder waits for the rest
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    started, first_token_at, count = time.perf_counter(), None, 0
    for token_id in generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k or None,
                             args.top_p, eos_id=tokenizer.eos_id, seed=args.seed):
        count += 1
        first_token_at = first_token_at or time.perf_counter()
        if token_id == tokenizer.eos_id:
            break
        sys.stdout.write(decoder.decode(tokenizer.token_bytes[token_id]))
        sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n")
    finished = time.perf_counter()
    # as sample.py reports it: tokens/s after the first token, which also pays for the prompt
    rate = (count - 1) / max(finished - first_token_at, 1e-9) if count > 1 else 0.0
    first = f"; first token after {first_token_at - STARTED:.2f} s" if first_token_at else ""
    print(f"[{count} tokens in {finished - started:.2f} s, {rate:.1f} tokens/s{first}]", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
