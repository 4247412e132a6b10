"""Tokenizers: text <-> token ids, in four kinds.

- "char": one id per distinct character of the training text (sorted). Tiny and
  transparent, good for Shakespeare-sized experiments.
- "bpe":  byte-level byte-pair encoding trained here, by `train_bpe`, on your corpus.
- "gpt2": GPT-2's own byte-level BPE (50,257 ids), so results compare with GPT-2's.
- "hf":   a Hugging Face model's own tokenizer (its tokenizer.json, run by the `tokenizers`
          library), so an imported model reads and writes text exactly as it was trained to.

Byte-level BPE works on UTF-8 bytes, so any text round-trips: decode(encode(s)) == s.
Training is ours and meant to be read; *encoding* goes through tiktoken (Rust), built
from our ranks, because data preparation encodes millions of tokens.

A tokenizer turns into a plain JSON-able dict (`to_dict`) that holds everything needed
to rebuild it, so a checkpoint carries its tokenizer and sampling needs no other file.
"""

import base64
import collections
import heapq
import json
import os
import re
import time

# regex, tiktoken and tokenizers are imported where a tokenizer of their kind is made: sampling
# a character model (the default run) then starts without loading any of them.

from model.errors import UserError
from model.files import atomic_write

# GPT-2's pre-split: contractions, letters, digits, other symbols, and whitespace runs
# become separate chunks, and BPE merges never cross a chunk boundary. (A run of spaces
# before a word keeps its last space for the word: " foo" is one chunk.)
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Llama 3's (and llama.cpp's "llama-bpe"): case-insensitive contractions, a letter run with one
# leading non-letter, at most 3 digits. run.py keeps its own copy (it imports nothing of ours).
LLAMA3_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                        r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
EOT = "<|endoftext|>"

# GPT-2's ranks in tiktoken's format (sha256 306cd27f...dd930, also shipped as gpt2.tiktoken).
GPT2_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"


class Tokenizer:
    """What every kind offers. Each subclass defines encode(text, allow_special=False) -> ids,
    token_bytes(id) -> bytes and to_dict() -> a JSON-serialisable description."""

    kind: str
    vocab_size: int  # number of ids, special tokens included
    eos_id: int | None  # id that ends a document (<|endoftext|>), None where the kind has none
    bos_id: int | None = None  # id that starts a document (Llama's <s>), None where the kind has none
    # the model's chat template (Jinja text, as transformers and llama.cpp store it), None where the
    # model came without one; it travels with the tokenizer, so a fine-tuned checkpoint keeps it
    chat_template: str | None = None

    def encode_prompt(self, text: str) -> list[int]:
        """The ids a user's prompt becomes (the hf kind adds its own special tokens, e.g. BOS)."""
        return self.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts as ordinary text (the fast path for data preparation)."""
        return [self.encode(text) for text in texts]

    def decode_bytes(self, ids) -> bytes:
        """The tokens' bytes, concatenated. For streaming: a multi-byte character may be
        split across tokens, so decode only once the bytes form whole characters."""
        return b"".join(self.token_bytes(int(i)) for i in ids)

    def decode(self, ids) -> str:
        # A model may emit bytes that are not valid UTF-8; show them as U+FFFD, don't crash.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _check_id(self, id: int):
        if not 0 <= id < self.vocab_size:
            raise UserError(f"token id {id} is outside this {self.kind} tokenizer's {self.vocab_size} ids")


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars, special_tokens=()):
        self.chars = list(chars)
        self.id_of = {ch: i for i, ch in enumerate(self.chars)}
        # markers a chat template writes (<|im_start|>...): whole tokens after the characters
        self.special_tokens = list(special_tokens)
        self.special_id = {name: len(self.chars) + i for i, name in enumerate(self.special_tokens)}
        self.vocab_size = len(self.chars) + len(self.special_tokens)
        self.eos_id = None

    def encode(self, text, allow_special=False):
        if allow_special and self.special_tokens:
            pieces = re.split("(" + "|".join(map(re.escape, self.special_tokens)) + ")", text)
            return [i for n, piece in enumerate(pieces)
                    for i in ([self.special_id[piece]] if n % 2 else self.encode(piece))]
        try:
            return [self.id_of[ch] for ch in text]
        except KeyError as e:
            ch = e.args[0]
            raise UserError(
                f"character {ch!r} (U+{ord(ch):04X}) is not in the character vocabulary "
                f"({self.vocab_size} characters, taken from the training text)"
            ) from None

    def token_text(self, id):
        return self.chars[id] if id < len(self.chars) else self.special_tokens[id - len(self.chars)]

    def token_bytes(self, id):
        self._check_id(id)
        return self.token_text(id).encode("utf-8", errors="surrogatepass")

    def decode(self, ids):
        # Joining characters directly is exact even for text that is not valid UTF-8.
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        return "".join(self.token_text(i) for i in ids)

    def to_dict(self):
        return {"kind": "char", "chars": self.chars,
                **({"special_tokens": self.special_tokens} if self.special_tokens else {}),
                **({"chat_template": self.chat_template} if self.chat_template else {})}


class BytePairTokenizer(Tokenizer):
    """A byte-level BPE ("bpe" or "gpt2"): ranks map each token's bytes to its id.

    Ids 0..n-1 are the mergeable tokens (every single byte among them) and id n is
    <|endoftext|>, so vocab_size = n + 1 and the end-of-text token is the last id. Markers a
    chat template writes (extra_special_tokens: <|im_start|>...) take the ids after it.
    """

    def __init__(self, kind: str, ranks: dict[bytes, int], pattern: str = GPT2_SPLIT_PATTERN,
                 extra_special_tokens=()):
        _check_ranks(ranks, f"{kind} tokenizer")
        self.kind = kind
        self.ranks = ranks
        self.pattern = pattern
        self.eos_id = len(ranks)
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate([EOT, *extra_special_tokens])}
        if len(self.special_tokens) != 1 + len(extra_special_tokens):
            raise UserError(f"{kind} tokenizer: special tokens must be distinct")
        self.vocab_size = len(ranks) + len(self.special_tokens)
        self.bytes_of = sorted(ranks, key=ranks.get) + [name.encode() for name in self.special_tokens]
        import tiktoken

        try:
            self.encoding = tiktoken.Encoding(
                name=f"{kind}-{self.vocab_size}",
                pat_str=pattern,
                mergeable_ranks=ranks,
                special_tokens=self.special_tokens,
                explicit_n_vocab=self.vocab_size,
            )
        except ValueError as e:  # e.g. a split pattern the Rust regex engine rejects
            raise UserError(f"cannot build the {kind} tokenizer: {e}") from None

    def encode(self, text, allow_special=False):
        # By default "<|endoftext|>" typed by a user is just text (13 characters), so no
        # input can smuggle in a document boundary or crash the encoder.
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.encoding.encode_ordinary_batch(list(texts))

    def token_bytes(self, id):
        self._check_id(id)
        return self.bytes_of[id]

    def decode_bytes(self, ids):
        ids = [int(i) for i in ids]  # accept numpy arrays and tensors too
        try:
            return self.encoding.decode_bytes(ids)
        except (KeyError, OverflowError):
            for i in ids:
                self._check_id(i)
            raise

    def to_dict(self):
        # The ranks in tiktoken's own file format, so this text could also be saved as
        # a .tiktoken file and loaded by gpt2_tokenizer(...) or tiktoken itself.
        return {"kind": self.kind, "pattern": self.pattern, "ranks": ranks_to_text(self.ranks),
                "special_tokens": self.special_tokens,
                **({"chat_template": self.chat_template} if self.chat_template else {})}

class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json, run by the `tokenizers` library (Rust, fast).

    Kept as the JSON text itself, so a checkpoint carries it like any other tokenizer.
    bos_id/eos_id come from the model's config files (see hf_tokenizer): tokenizer.json
    lists special tokens but does not say which one starts or ends a document, nor how a chat
    is written (chat_template: tokenizer_config.json's, or a GGUF file's)."""

    kind = "hf"

    def __init__(self, tokenizer_json: str, bos_id=None, eos_id=None, chat_template=None):
        import tokenizers

        try:
            self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the Rust side raises a plain Exception for any bad field
            raise UserError(f"not a readable tokenizer.json: {str(e)[:200]}") from None
        # normalised by the library, so the same tokenizer always gives the same text (train.py
        # compares a checkpoint's tokenizer with the data set's)
        self.tokenizer_json = self.tokenizer.to_str()
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.bos_id, self.eos_id = bos_id, eos_id
        if chat_template is not None and not isinstance(chat_template, str):
            raise UserError("chat_template must be text (a Jinja template)")
        self.chat_template = chat_template or None
        self.bytes_of = self._token_bytes_table(vocab)

    def _token_bytes_table(self, vocab):
        """Every id's bytes, as the decoder would produce them for that token alone."""
        decoder = json.loads(self.tokenizer_json).get("decoder") or {}
        decoder_types = {d.get("type") for d in decoder.get("decoders", [decoder])}
        byte_of_char = {ch: b for b, ch in byte_to_unicode().items()}
        special = {id: added.content for id, added in self.tokenizer.get_added_tokens_decoder().items()}
        table = [b""] * self.vocab_size
        for token, id in vocab.items():
            if id in special:
                table[id] = special[id].encode("utf-8")
            elif "ByteLevel" in decoder_types and all(ch in byte_of_char for ch in token):
                # GPT-2's trick: each byte was stored as a printable character
                table[id] = bytes(byte_of_char[ch] for ch in token)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                table[id] = bytes([int(token[3:5], 16)])  # SentencePiece's byte fallback
            else:
                # SentencePiece style: '▁' marks a space. Best effort: decode() is exact,
                # this is for streaming (the decoder may strip the text's very first space).
                table[id] = token.replace("\u2581", " ").encode("utf-8")
        return table

    def _encode(self, texts, add_special_tokens, allow_special):
        # A user's text that spells a special token ("<|endoftext|>") stays text unless allowed.
        self.tokenizer.encode_special_tokens = not allow_special
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def encode(self, text, allow_special=False):
        return self._encode([text], False, allow_special)[0]

    def encode_batch(self, texts):
        return self._encode(list(texts), False, False)

    def encode_prompt(self, text):
        # exactly what transformers' AutoTokenizer(text) gives: special tokens in the text are
        # parsed, and the tokenizer's post-processor adds its own (Llama's BOS, for one)
        return self._encode([text], True, True)[0]

    def token_bytes(self, id):
        self._check_id(id)
        return self.bytes_of[id]

    def decode(self, ids):
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def to_dict(self):
        return {"kind": "hf", "tokenizer_json": self.tokenizer_json, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "chat_template": self.chat_template}


def split_rule_of(pre_tokenizer):
    """The split rule a tokenizer.json pre_tokenizer applies, by run.py's names (gpt2, digits_gpt2,
    llama3; a GGUF file names the same rules gpt-2, smollm and llama-bpe), or None for any other."""
    def byte_level(step, use_regex):
        return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space")
                and step.get("use_regex", True) == use_regex)

    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    if len(steps) == 1 and byte_level(steps[0], True):  # GPT-2
        return "gpt2"
    if len(steps) == 2 and steps[0] == {"type": "Digits", "individual_digits": True} and byte_level(steps[1], True):
        return "digits_gpt2"  # SmolLM2
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("pattern") == {"Regex": LLAMA3_SPLIT_PATTERN}
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") and byte_level(steps[1], False)):
        return "llama3"
    return None


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character: the 188 printable Latin-1 bytes
    stand for themselves, the others (controls, space) take the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def hf_tokenizer(folder: str) -> Tokenizer:
    """folder/tokenizer.json, with the start/end-of-document ids from the model's config files
    (generation_config.json, then config.json, then tokenizer_config.json's token names) and
    the chat template (chat_template.jinja, else tokenizer_config.json's chat_template)."""
    path = os.path.join(folder, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"no tokenizer.json in {folder} (only tokenizers in the `tokenizers` library's "
                        "format are supported)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    tokenizer = HFTokenizer(text)

    def read_json(name):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def first_id(value):  # an id, a list of ids (Llama 3 instruct's several eos), or a token name
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, dict):  # tokenizer_config.json's {"content": "<s>", ...}
            value = value.get("content")
        if isinstance(value, str):
            value = tokenizer.tokenizer.token_to_id(value)
        return value if isinstance(value, int) and 0 <= value < tokenizer.vocab_size else None

    sources = [read_json("generation_config.json"), read_json("config.json")]
    tokenizer_config = read_json("tokenizer_config.json")
    for name in ("bos", "eos"):
        found = [first_id(source.get(f"{name}_token_id")) for source in sources]
        found.append(first_id(tokenizer_config.get(f"{name}_token")))
        setattr(tokenizer, f"{name}_id", next((i for i in found if i is not None), None))
    tokenizer.chat_template = read_chat_template(folder, tokenizer_config)
    return tokenizer


def read_chat_template(folder, tokenizer_config):
    """A Hugging Face folder's chat template: transformers 4.43+ may write it to its own file,
    chat_template.jinja; older folders keep it in tokenizer_config.json, as a string or as a
    list of named templates (then the one named "default")."""
    try:
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            return f.read() or None
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {os.path.join(folder, 'chat_template.jinja')}: {e}") from None
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def ranks_to_text(ranks: dict[bytes, int]) -> str:
    """tiktoken's format: one `base64(token bytes) rank` line per token, in rank order."""
    return "".join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in sorted(ranks.items(), key=lambda kv: kv[1]))


def ranks_from_text(text, source: str) -> dict[bytes, int]:
    """Parse tiktoken's format (str or bytes); any malformed line is a UserError."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    ranks = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:  # wrong field count, bad base64 (binascii.Error) or bad int
            raise UserError(f"{source} is not a tiktoken ranks file (line {number}: {line[:60]!r})") from None
    _check_ranks(ranks, source)
    return ranks


def _check_ranks(ranks, source):
    # tiktoken needs all 256 single bytes to encode arbitrary text, and we need the ids
    # to be exactly 0..n-1 so that <|endoftext|> = n is the last id.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{source}: token ranks must be 0..{len(ranks) - 1}, each exactly once")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise UserError(f"{source}: not a byte-level BPE (some of the 256 single bytes are missing)")


def char_tokenizer_from_text(text: str) -> Tokenizer:
    if not text:
        raise UserError("cannot build a character vocabulary from empty text")
    return CharTokenizer(sorted(set(text)))


def train_bpe(texts: list[str], vocab_size: int, verbose: bool = False) -> Tokenizer:
    """Learn a byte-level BPE with `vocab_size` ids (256 bytes + merges + <|endoftext|>).

    1. Split every text with GPT-2's pattern and count the distinct chunks: a corpus of
       millions of words has only tens of thousands of distinct ones, and merges happen
       inside chunks, so we work on (chunk, count) pairs instead of the whole text.
    2. Count every adjacent pair of tokens, weighted by chunk count.
    3. Repeatedly merge the most frequent pair into a new token. Only the chunks that
       contain the pair change, so we keep an index pair -> chunks and update the pair
       counts of just those chunks. A heap gives the most frequent pair; entries whose
       count has since changed are skipped when popped ("lazy deletion").
    Ties go to the smallest pair of ids, so the same texts always give the same ranks.
    If the corpus runs out of pairs first, the vocabulary is smaller than asked for.
    """
    if vocab_size < 257:
        raise UserError(f"a byte-level BPE needs vocab_size >= 257 (256 bytes + {EOT}), got {vocab_size}")
    import regex  # the GPT-2 pattern's \p{L} classes need it (the standard re has none)

    start = time.time()
    split = regex.compile(GPT2_SPLIT_PATTERN)
    chunk_counts = collections.Counter()
    for text in texts:
        chunk_counts.update(split.findall(text))
    # Each distinct chunk as a list of token ids (its UTF-8 bytes to begin with).
    words = [list(chunk.encode("utf-8", errors="replace")) for chunk in chunk_counts]
    counts = list(chunk_counts.values())
    if verbose:
        print(f"bpe: {sum(counts):,} chunks, {len(words):,} distinct, split in {time.time() - start:.1f}s")

    pair_counts = collections.Counter()
    chunks_with = collections.defaultdict(set)  # pair -> ids of chunks that (may) contain it
    for w, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            chunks_with[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    token_bytes = [bytes([b]) for b in range(256)]
    id_of = {b: i for i, b in enumerate(token_bytes)}
    merges = 0
    while len(token_bytes) < vocab_size - 1 and heap:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -negative_count:
            continue  # stale heap entry: this pair's count changed after it was pushed
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        # tiktoken needs one id per byte string; should a second pair ever spell bytes we
        # already have ("ab"+"c" after "a"+"bc"), the merge reuses the existing token.
        new_id = id_of.get(merged)
        if new_id is None:
            new_id = id_of[merged] = len(token_bytes)
            token_bytes.append(merged)
        merges += 1
        if verbose and (merges % 500 == 0 or len(token_bytes) == vocab_size - 1):
            print(f"bpe: merge {merges} -> id {new_id} {merged!r} (seen {-negative_count:,} times)")

        delta = collections.Counter()  # change of each pair's count caused by this merge
        for w in chunks_with.pop(pair):
            word, count = words[w], counts[w]
            new_word = _merge_pair(word, pair, new_id)
            if len(new_word) == len(word):
                continue  # stale index entry: an earlier merge already consumed the pair here
            for p in zip(word, word[1:]):
                delta[p] -= count
            for p in zip(new_word, new_word[1:]):
                delta[p] += count
                chunks_with[p].add(w)
            words[w] = new_word
        for p, change in delta.items():
            if change:
                pair_counts[p] += change
                if pair_counts[p] > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))
                else:
                    del pair_counts[p]
    if verbose:
        print(f"bpe: {len(token_bytes) + 1} ids from {merges} merges in {time.time() - start:.1f}s")
    return BytePairTokenizer("bpe", {b: i for i, b in enumerate(token_bytes)})


def _merge_pair(word: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each occurrence of `pair` in `word`, left to right, by `new_id`."""
    first, second = pair
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def gpt2_tokenizer(tokenizer_file: str | None = None) -> Tokenizer:
    """GPT-2's tokenizer: offline from a gpt2.tiktoken file, else through tiktoken's download cache."""
    if tokenizer_file:
        # Read the file ourselves: tiktoken's loader would also copy it into a cache keyed
        # by path, and then keep serving the old copy if the file at that path changes.
        try:
            with open(tokenizer_file, "rb") as f:
                ranks = ranks_from_text(f.read(), tokenizer_file)
        except FileNotFoundError:
            raise UserError(f"tokenizer file {tokenizer_file} not found") from None
        except OSError as e:
            raise UserError(f"cannot read tokenizer file {tokenizer_file}: {e.strerror}") from None
        return BytePairTokenizer("gpt2", ranks)
    import tiktoken

    try:
        encoding = tiktoken.get_encoding("gpt2")  # downloads once, then cached
    except Exception as e:  # no network, proxy, corrupt cache...: all mean "give us the file"
        raise UserError(
            f"could not get GPT-2's tokenizer ({type(e).__name__}); download {GPT2_TIKTOKEN_URL} "
            f"and pass --tokenizer_file=path/to/gpt2.tiktoken"
        ) from None
    ranks = {encoding.decode_single_token_bytes(i): i for i in range(encoding.eot_token)}
    return BytePairTokenizer("gpt2", ranks)


def tokenizer_from_dict(d) -> Tokenizer:
    """Rebuild a tokenizer from `to_dict()` output; anything malformed is a UserError."""
    tokenizer = _tokenizer_from_dict(d)
    template = d.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise UserError("tokenizer data is corrupt: chat_template must be text (a Jinja template)")
    tokenizer.chat_template = template or None
    return tokenizer


def _tokenizer_from_dict(d):
    kind = d.get("kind") if isinstance(d, dict) else None
    try:
        if kind == "char":
            chars = d["chars"]
            if not chars or not all(isinstance(c, str) and len(c) == 1 for c in chars) or len(set(chars)) != len(chars):
                raise ValueError("chars must be distinct single characters")
            special = d.get("special_tokens", [])
            if not all(isinstance(t, str) and len(t) > 1 for t in special) or len(set(special)) != len(special):
                raise ValueError("special_tokens must be distinct texts of two or more characters")
            return CharTokenizer(chars, special)
        if kind in ("bpe", "gpt2"):
            if not isinstance(d["ranks"], str) or not isinstance(d["pattern"], str):
                raise ValueError("ranks and pattern must be text")
            ranks = ranks_from_text(d["ranks"], f"{kind} tokenizer data")
            special = d.get("special_tokens", {EOT: len(ranks)})
            names = sorted(special, key=special.get)
            if names[:1] != [EOT] or sorted(special.values()) != list(range(len(ranks), len(ranks) + len(special))):
                raise ValueError(f"expected special tokens {{{EOT!r}: {len(ranks)}, ...}} numbered on from there")
            return BytePairTokenizer(kind, ranks, d["pattern"], names[1:])
        if kind == "hf":
            return HFTokenizer(d["tokenizer_json"], d.get("bos_id"), d.get("eos_id"), d.get("chat_template"))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"tokenizer data is corrupt: {type(e).__name__}: {e}") from None
    raise UserError(f"tokenizer data is corrupt: unknown kind {kind!r} (expected char, bpe, gpt2 or hf)")


def with_special_tokens(tokenizer: Tokenizer, names) -> Tokenizer:
    """The same tokenizer with `names` (those it lacks) as new special tokens, each one id after
    the current last id: every existing id keeps its meaning, so a model's embedding only grows.
    Each kind keeps them where it keeps its own special tokens: after the characters (char),
    after <|endoftext|> (bpe, gpt2: tiktoken's special tokens), as added tokens (hf)."""
    d = tokenizer.to_dict()
    if tokenizer.kind == "char":
        new = [n for n in names if n not in tokenizer.special_tokens]
        return tokenizer_from_dict({**d, "special_tokens": tokenizer.special_tokens + new})
    if tokenizer.kind in ("bpe", "gpt2"):
        new = {n: tokenizer.vocab_size + i for i, n in enumerate(n for n in names if n not in tokenizer.special_tokens)}
        return tokenizer_from_dict({**d, "special_tokens": {**tokenizer.special_tokens, **new}})
    import tokenizers

    hf = tokenizers.Tokenizer.from_str(tokenizer.tokenizer_json)  # a copy: the original stays as it was
    hf.add_special_tokens([tokenizers.AddedToken(n, special=True, normalized=False) for n in names])
    return HFTokenizer(hf.to_str(), tokenizer.bos_id, tokenizer.eos_id, tokenizer.chat_template)


def save_tokenizer(tokenizer: Tokenizer, path: str):
    """Write the tokenizer as JSON, atomically (a crash never leaves half a file)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(tokenizer.to_dict(), f)  # ASCII escapes: safe for any character


def load_tokenizer(path: str) -> Tokenizer:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise UserError(f"tokenizer file {path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"tokenizer file {path} is not readable JSON: {e}") from None
    return tokenizer_from_dict(d)


def tokenizer_json(tokenizer: Tokenizer) -> dict:
    """The tokenizer as a tokenizer.json (the `tokenizers` library's format, which transformers'
    AutoTokenizer reads), giving the same ids as tokenizer.encode for any text."""
    import tokenizers
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    if tokenizer.kind == "hf":
        return json.loads(tokenizer.tokenizer_json)
    if tokenizer.kind == "char":
        # every character is a word of its own, looked up in a table; decoding glues them back
        hf = tokenizers.Tokenizer(models.WordLevel({ch: i for i, ch in enumerate(tokenizer.chars)}, unk_token="<unk>"))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        # a chat template's markers: added tokens take the next ids, as they have here
        hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in tokenizer.special_tokens])
        return json.loads(hf.to_str())
    # Byte-level BPE: the same split pattern, then GPT-2's byte-to-character trick, then merges.
    # tiktoken merges whichever adjacent pair forms the lowest-ranked token; a merge list
    # ordered by the rank of the token each merge makes does the same. (This is how
    # transformers converts tiktoken files too.) tiktoken also takes a chunk whole when it
    # is a token itself: ignore_merges.
    char_of = byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(char_of[b] for b in token)

    ranks = tokenizer.ranks
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
    bpe = models.BPE({text(token): rank for token, rank in ranks.items()},
                     [(text(a), text(b)) for a, b in merges], ignore_merges=True)
    hf = tokenizers.Tokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in tokenizer.special_tokens])
    return json.loads(hf.to_str())
