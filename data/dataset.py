"""Prepared data sets: text from a file, folder, URL or Hugging Face dataset, cut into
train/val, tokenized, and written as data/NAME/{train.bin, val.bin, tokenizer.json, meta.json}
(conversations, from .jsonl files or hf: rows with messages, go to data/conversations.py).
`prepare()` does it all; data/prepare.py is its command line (whose docstring describes the
sources, tokenizers, split and files in detail), and train.py calls it to prepare a built-in
data set on first use.
"""

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import sysconfig
import time
import urllib.parse
import urllib.request
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.errors import UserError
from model.files import atomic_write
from model.tokenizer import (
    char_tokenizer_from_text,
    gpt2_tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
    train_bpe,
)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
STDLIB = "python:stdlib"  # the source of the pystdlib corpus
BUILTINS = {  # name -> (default source, default tokenizer, default bpe vocabulary size)
    # pystdlib: a 1024-id BPE makes tokens of ~2.6 bytes (keywords and indentation become single
    # tokens), so the 4-minute default run sees 2.6x more code than at one character per token.
    "pystdlib": (STDLIB, "bpe", 1024),
    "shakespeare_char": (SHAKESPEARE_URL, "char", 0),
    "shakespeare": (SHAKESPEARE_URL, "gpt2", 0),
}
DEFAULT_VOCAB_SIZE = 4096
TOKENIZERS = ("char", "bpe", "gpt2")
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
HF_FILE_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}
ENCODE_BATCH_CHARS = 8_000_000  # text per encode_batch call: big enough to use every core, small enough for memory
PIECE_CHARS = 1_000_000  # longer documents are cut into parts of about this size for encoding
# A newline with non-space characters on both sides. GPT-2's pre-split makes such a newline a chunk
# of its own, and BPE never merges across chunks, so cutting the text just after it changes no id.
# (Python's \S is a little narrower than the tokenizer's, which only makes the rule stricter.)
SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def note(message):
    print(f"note: {message}", file=sys.stderr)


# ---------------------------------------------------------------- reading text


def cap_bytes(documents, max_bytes):
    """Yield documents until max_bytes of UTF-8 text; the document that crosses the cap is cut."""
    total = 0
    for text in documents:
        if max_bytes and total >= max_bytes:
            return
        size = len(text.encode("utf-8"))
        if max_bytes and total + size > max_bytes:
            # errors="ignore" drops a character cut in half by the byte limit.
            text = text.encode("utf-8")[: max_bytes - total].decode("utf-8", errors="ignore")
            size = len(text.encode("utf-8"))
        total += size
        yield text


def read_text_file(path):
    """The file's text, or None when it is binary or not UTF-8 (reading bytes keeps \\r\\n as is)."""
    data = Path(path).read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def folder_documents(folder, files=None):
    """One document per readable text file under folder, in sorted order."""
    if files is None:
        files = [p for p in sorted(folder.rglob("*"))
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    skipped = []
    for path in files:
        text = read_text_file(path)
        if text is None:
            skipped.append(path)
            if len(skipped) <= 5:
                note(f"skipping {path}: binary or not UTF-8")
            continue
        yield text
    if len(skipped) > 5:
        note(f"skipped {len(skipped)} binary or non-UTF-8 files in all")


def stdlib_files():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if not any(part in STDLIB_SKIP or part.startswith("test") for part in parts):
            files.append(path)
    return root, files


def download(url, data_root):
    """Fetch url once into data_root/.cache/ (atomically) and return the cached path."""
    basename = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urllib.parse.urlparse(url).path).name) or "download"
    # The hash keeps two URLs that end in the same file name (input.txt...) apart.
    path = Path(data_root) / ".cache" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{basename}"
    if path.exists():
        print(f"using cached {path} ({url})", file=sys.stderr)
        return path
    print(f"downloading {url} -> {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_write(path) as f:
            shutil.copyfileobj(response, f)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
        reason = getattr(e, "reason", None) or e
        raise UserError(f"could not download {url} ({reason}); download it yourself and pass --input=FILE") from None
    return path


def hf_rows(spec, split, data_root):
    """The rows (dicts) of an hf: source (hub name or local path), read through `datasets` in
    streaming mode; its errors become UserErrors."""
    import datasets  # only hf: sources need it, and it is slow to import

    local = Path(spec).expanduser()
    # Streaming reads the rows in place (no Arrow copy of the whole set); what little `datasets`
    # keeps on disk goes to the data folder's own cache, next to our other downloads.
    options = dict(streaming=True, cache_dir=str(Path(data_root) / ".cache" / "huggingface"))
    try:
        if local.is_dir():
            dataset = datasets.load_dataset(str(local), split=split, **options)
        elif local.is_file():
            builder = HF_FILE_FORMATS.get(local.suffix.lower())
            if builder is None:
                raise UserError(f"hf:{spec}: unknown data file type {local.suffix!r} "
                                f"(expected one of {', '.join(HF_FILE_FORMATS)})")
            dataset = datasets.load_dataset(builder, data_files=str(local), split="train", **options)
        else:
            name, _, subset = spec.partition(":")
            dataset = datasets.load_dataset(name, subset or None, split=split, **options)
        yield from dataset
    except UserError:
        raise
    except Exception as e:  # datasets reports missing repos, network and format trouble with many types
        where = "" if local.exists() else "; offline? download its data files and pass --input=FILE or hf:/local/folder"
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"could not read hf:{spec} ({type(e).__name__}: {message}){where}") from None


def hf_documents(spec, split, text_field, data_root):
    """Texts of an hf: source: its text_field column."""
    progress = tqdm(desc=f"reading hf:{spec}", unit="char", unit_scale=True, disable=None)
    for row in hf_rows(spec, split, data_root):
        if text_field not in row:
            raise UserError(f"hf:{spec} has no column {text_field!r} (columns: {', '.join(row)}); "
                            f"pass --text_field=NAME")
        text = row[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise UserError(f"hf:{spec} column {text_field!r} holds {type(text).__name__}, not text")
        progress.update(len(text))
        yield text
    progress.close()


def read_documents(source, data_root, split, text_field, max_bytes):
    """(list of document texts, description of the source). Empty documents are dropped."""
    if source == STDLIB:
        root, files = stdlib_files()
        documents, description = folder_documents(root, files), f"python stdlib {root}"
    elif source.startswith("hf:"):
        documents, description = hf_documents(source[3:], split, text_field, data_root), source
    elif source.startswith(("http://", "https://")):
        documents, description = [read_text_file(download(source, data_root))], source
        if documents[0] is None:
            raise UserError(f"{source} is not UTF-8 text")
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            documents, description = folder_documents(path), str(path)
        elif path.is_file():
            text = read_text_file(path)
            if text is None:
                raise UserError(f"{path} is not UTF-8 text (binary or another encoding)")
            documents, description = [text], str(path)
        else:
            raise UserError(f"input {source} not found (a file, folder, http(s) URL or hf:NAME)")
    texts = [text for text in cap_bytes(documents, max_bytes) if text]
    if not texts:
        raise UserError(f"no text found in {description}")
    return texts, description


# ---------------------------------------------------------------- splitting


def split_documents(documents, val_fraction):
    """Pieces (text, is_val, ends_document) in order, and how the split was made."""
    fraction = Fraction(val_fraction).limit_denominator(1_000_000)  # exact 1/10, not 0.1000000000000000055
    n = len(documents)
    if n >= 10 and n * fraction >= 1:
        # Document i goes to val when the running count floor((i+1) * f) steps up: evenly spread, and
        # for f = 1/10 exactly the documents with i % 10 == 9.
        pieces = [(doc, (i + 1) * fraction // 1 > i * fraction // 1, True) for i, doc in enumerate(documents)]
        return pieces, "documents"
    text_length = sum(len(doc) for doc in documents)
    cut = int(text_length * (1 - fraction))
    joined = "".join(documents)  # only to find the newline; the pieces keep document boundaries
    newline = joined.find("\n", cut)
    if newline != -1:
        cut = newline + 1
    if cut >= text_length:
        raise UserError(f"the text ({text_length:,} characters) is too short to hold out a validation part "
                        f"after the last newline; give more text or a larger --val_fraction")
    pieces, start = [], 0
    for doc in documents:
        end = start + len(doc)
        if end <= cut:
            pieces.append((doc, False, True))
        elif start >= cut:
            pieces.append((doc, True, True))
        else:  # the cut falls inside this document: its head trains, its tail validates
            pieces.append((doc[: cut - start], False, False))
            pieces.append((doc[cut - start:], True, True))
        start = end
    return pieces, "text"


# ---------------------------------------------------------------- tokenizing


def choose_tokenizer(name, spec, tokenizer_file):
    """(kind to build, or an existing tokenizer to reuse, and why) for --tokenizer=spec ('' = the default)."""
    if not spec:
        if name in BUILTINS:
            return BUILTINS[name][1], f"the built-in data set {name}'s default"
        return "char", ("the default for a new data set; to fine-tune a model, pass its tokenizer: "
                        "--tokenizer=OUT_DIR or --tokenizer=hf:MODEL")
    if spec in TOKENIZERS:
        return spec, "as --tokenizer asked"
    if tokenizer_file:
        raise UserError(f"--tokenizer_file is for char, bpe and gpt2; --tokenizer={spec} brings its own tokenizer")
    if spec.startswith("hf:"):  # a Hugging Face model's tokenizer.json (and its bos/eos ids)
        from model.hf import resolve_hf_folder
        from model.tokenizer import hf_tokenizer

        return hf_tokenizer(resolve_hf_folder(spec[3:], tokenizer_only=True)), f"the tokenizer of {spec}"
    if spec.lower().endswith(".gguf"):  # a GGUF file's vocabulary (its weights are not read)
        from model.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(spec), f"the tokenizer of {spec}"
    if os.path.exists(spec):  # a model trained here: its checkpoint carries its tokenizer
        from model.checkpoint import load_checkpoint  # imports torch: only when a checkpoint is read

        checkpoint = load_checkpoint(spec)
        return tokenizer_from_dict(checkpoint["tokenizer"]), f"the tokenizer of the model in {spec}"
    raise UserError(f"unknown tokenizer {spec!r}: choose {', '.join(TOKENIZERS)}, hf:<folder or owner/name>, "
                    f"a .gguf file, or the path of a ckpt.pt or out_dir whose model's tokenizer to reuse")


def build_tokenizer(kind, pieces, vocab_size, tokenizer_file):
    if kind == "gpt2":
        return gpt2_tokenizer(tokenizer_file or None)
    if tokenizer_file:
        if not Path(tokenizer_file).is_file():
            raise UserError(f"tokenizer file {tokenizer_file} not found")
        tokenizer = load_tokenizer(tokenizer_file)
        if tokenizer.kind != kind:
            raise UserError(f"{tokenizer_file} holds a {tokenizer.kind} tokenizer, not {kind}")
        return tokenizer
    if kind == "char":
        # Built from both splits: a validation character the tokenizer never saw could not be encoded.
        return char_tokenizer_from_text("".join(text for text, _, _ in pieces))
    # Trained on the train split only, so validation text is as new to the tokenizer as to the model.
    return train_bpe([text for text, is_val, _ in pieces if not is_val], vocab_size)


def token_dtype(vocab_size):
    """uint16 while every id (0 .. vocab_size-1) fits in 16 bits: half the disk and memory of uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def cut_long_pieces(pieces):
    """Cut pieces longer than PIECE_CHARS at safe newlines, so that one huge file still encodes in
    parallel batches and bounded memory, into exactly the ids the uncut text would give."""
    parts = []
    for text, is_val, ends_document in pieces:
        start = 0
        while len(text) - start > PIECE_CHARS:
            cut = SAFE_CUT.search(text, start + PIECE_CHARS)
            if cut is None:
                break
            parts.append((text[start:cut.end()], is_val, False))
            start = cut.end()
        parts.append((text[start:] if start else text, is_val, ends_document))
    return parts


def encode_pieces(tokenizer, pieces, dtype, files):
    """Encode the pieces in batches and append their ids to files[is_val]; returns (tokens, bytes) per split."""
    tokens, nbytes = [0, 0], [0, 0]
    eot = tokenizer.eos_id
    batch, batch_chars = [], 0
    progress = tqdm(total=sum(len(text) for text, _, _ in pieces), desc="encoding", unit="char",
                    unit_scale=True, disable=None)

    def flush():
        encoded = tokenizer.encode_batch([text for text, _, _ in batch])
        for split in (0, 1):
            ids = []
            for (text, is_val, ends_document), piece_ids in zip(batch, encoded):
                if is_val == split:
                    ids.extend(piece_ids)
                    if ends_document and eot is not None:
                        ids.append(eot)
                    nbytes[split] += len(text.encode("utf-8"))
            np.asarray(ids, dtype=dtype).tofile(files[split])
            tokens[split] += len(ids)
        progress.update(sum(len(text) for text, _, _ in batch))
        batch.clear()

    for piece in pieces:
        batch.append(piece)
        batch_chars += len(piece[0])
        if batch_chars >= ENCODE_BATCH_CHARS:
            flush()
            batch_chars = 0
    if batch:
        flush()
    progress.close()
    return tokens, nbytes


# ---------------------------------------------------------------- writing


def write_meta(out_dir, name, tokenizer, dtype, tokens, nbytes, documents, source, sha256, split_by, **extra):
    """Write out_dir/meta.json, last: the record that a preparation is complete, which training
    reads. The keys every prepared set has (tokens and bytes per split as (train, val)), then
    what a kind of set adds (extra: conversations' mask and trained-token counts). Returns it."""
    meta = {"name": name, "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "dtype": np.dtype(dtype).name, "train_tokens": tokens[0], "val_tokens": tokens[1],
            "train_bytes": nbytes[0], "val_bytes": nbytes[1], "documents": documents, "source": source,
            "sha256": sha256, "eos_id": tokenizer.eos_id, "split_by": split_by, **extra}
    with atomic_write(Path(out_dir) / "meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return meta


def prepare(name, input=None, tokenizer=None, vocab_size=0, tokenizer_file=None, split="train",
            text_field="text", max_bytes=0, val_fraction=0.1, data_root="data"):
    """Read, split, tokenize and write data_root/name/; returns the meta dict (also in meta.json)."""
    start_time = time.time()
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise UserError(f"dataset name {name!r} must be a plain folder name (letters, digits, _ . -)")
    default_source, _, default_vocab = BUILTINS.get(name, (None, "char", 0))
    source = input or default_source
    vocab_size = vocab_size or default_vocab or DEFAULT_VOCAB_SIZE
    if source is None:
        raise UserError(f"{name} is not a built-in dataset ({', '.join(BUILTINS)}); pass --input=SOURCE")
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if max_bytes < 0:
        raise UserError(f"--max_bytes must be >= 0, got {max_bytes}")
    kind, why = choose_tokenizer(name, tokenizer, tokenizer_file)
    from data.conversations import is_conversation_source, prepare_conversations

    if source != STDLIB and is_conversation_source(source, data_root, split, text_field):
        return prepare_conversations(name, source, kind, why, vocab_size, tokenizer_file, split, val_fraction,
                                     data_root)

    documents, description = read_documents(source, data_root, split, text_field, max_bytes)
    sha256 = hashlib.sha256()
    for doc in documents:
        sha256.update(doc.encode("utf-8"))
    pieces, split_by = split_documents(documents, val_fraction)
    read_time = time.time()
    tok = build_tokenizer(kind, pieces, vocab_size, tokenizer_file) if isinstance(kind, str) else kind
    dtype = token_dtype(tok.vocab_size)

    out_dir = Path(data_root) / name
    created = not out_dir.exists()
    try:
        # Each file is written to a temporary name and replaces the old one only when the whole
        # block has succeeded (the exit of the ExitStack); a failure leaves the old data set intact.
        with contextlib.ExitStack() as files:
            train_file = files.enter_context(atomic_write(out_dir / "train.bin"))
            val_file = files.enter_context(atomic_write(out_dir / "val.bin"))
            tokens, nbytes = encode_pieces(tok, cut_long_pieces(pieces), dtype, [train_file, val_file])
            for split_name, count in (("train", tokens[0]), ("val", tokens[1])):
                if count < 2:  # a loader needs at least one input and one target token
                    raise UserError(f"the {split_name} split would hold {count} token(s); give more text "
                                    f"or change --val_fraction")
            with files.enter_context(atomic_write(out_dir / "tokenizer.json", "w", encoding="utf-8")) as f:
                json.dump(tok.to_dict(), f)
            # meta.json marks a complete preparation: drop the old one before the new files replace
            # the old ones, so a crash in between never leaves a meta.json describing the wrong files.
            (out_dir / "meta.json").unlink(missing_ok=True)
        meta = write_meta(out_dir, name, tok, dtype, tokens, nbytes, len(documents), description, sha256.hexdigest(),
                          split_by)
    finally:
        if created and out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()

    seconds = time.time() - start_time
    total_bytes = nbytes[0] + nbytes[1]
    print(f"read {len(documents):,} documents, {total_bytes / 1e6:.2f} MB of text from {description} "
          f"({read_time - start_time:.1f}s)", file=sys.stderr)
    print(f"tokenizer {tok.kind}, vocab {tok.vocab_size:,}; {tokens[0] + tokens[1]:,} tokens, "
          f"{total_bytes / max(1, tokens[0] + tokens[1]):.2f} bytes/token; split by {split_by}", file=sys.stderr)
    for i, split_name in enumerate(("train", "val")):
        print(f"  {split_name}: {tokens[i]:,} tokens ({nbytes[i]:,} bytes of text) -> "
              f"{out_dir / (split_name + '.bin')} ({tokens[i] * np.dtype(dtype).itemsize / 1e6:.2f} MB {meta['dtype']})",
              file=sys.stderr)
    print(f"prepared {out_dir} in {seconds:.1f}s", file=sys.stderr)
    print(f"tokenizer: {tok.kind} with {tok.vocab_size:,} ids, {why}", file=sys.stderr)
    return meta
