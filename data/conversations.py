"""Conversations -> token files plus a loss mask, for teaching a model to chat.

Sources (data/prepare.py NAME --input=SOURCE): a .jsonl file, a folder of .jsonl files, or an
hf: data set, whose rows are either
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
        (the format of Hugging Face chat data sets such as smol-smoltalk), or
    {"instruction": "...", "input": "..." (optional), "output": "..."}
        (Alpaca's: one user turn, the instruction and then its input, and the reply).

Each conversation is written out by the model's chat template (model/chat.py; a model without
one gets the default ChatML template, its markers as new special tokens) and encoded into ids
and a mask: 1 on the tokens the assistant says, its end-of-turn marker included, 0 elsewhere.
Conversations are kept whole and the split is by conversation (the same evenly spread rule as
documents: for --val_fraction=0.1 every 10th conversation validates).

Files, beside the usual train.bin / val.bin / tokenizer.json / meta.json:
    {split}_mask.bin    one uint8 per token: 1 = trained (an assistant's token), 0 = context
    {split}_starts.bin  int64 offsets where each conversation begins: training windows start
                        there, so no window begins inside a conversation (data/loader.py)
"""

import contextlib
import hashlib
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.dataset import write_meta
from model.chat import DEFAULT_CHAT_TEMPLATE, check_messages, encode_conversation, render_messages, with_chat_template
from model.errors import UserError
from model.files import atomic_write

TRAINED_START, TRAINED_END = "\u27e6", "\u27e7"  # ⟦ ⟧ around the trained tokens in the printed example


def is_conversation_source(source, data_root, split, text_field):
    """Whether SOURCE holds conversations rather than text: a .jsonl file, a folder of them, or
    an hf: data set whose rows have a messages (or instruction and output) column and no
    text_field column."""
    if source.startswith("hf:"):
        from data.dataset import hf_rows

        first = next(iter(hf_rows(source[3:], split, data_root)), None)
        return isinstance(first, dict) and text_field not in first and (
            "messages" in first or {"instruction", "output"} <= set(first))
    path = Path(source).expanduser()
    if path.is_file():
        return path.suffix.lower() == ".jsonl"
    if path.is_dir():
        files = jsonl_files(path)
        return bool(files) and all(p.suffix.lower() == ".jsonl" for p in visible_files(path))
    return False


def visible_files(folder):
    return [p for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def jsonl_files(folder):
    return [p for p in visible_files(folder) if p.suffix.lower() == ".jsonl"]


def conversation_from_row(row, where):
    """A row's messages (see the module's docstring); anything else is a UserError naming `where`."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a row must be a JSON object with messages, or instruction and output")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list):
            raise UserError(f"{where}: messages must be a list of {{role, content}}")
        messages = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                    for m in messages]
    elif "instruction" in row and "output" in row:
        instruction, extra, output = row["instruction"], row.get("input") or "", row["output"]
        if not all(isinstance(v, str) for v in (instruction, extra, output)):
            raise UserError(f"{where}: instruction, input and output must be text")
        messages = [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")},
                    {"role": "assistant", "content": output}]
    else:
        raise UserError(f"{where}: a row needs messages, or instruction and output (it has: {', '.join(row) or 'none'})")
    try:
        check_messages(messages)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the conversation has no assistant message, so nothing in it would be trained")
    return messages


def read_conversations(source, data_root, split):
    """[(messages, where)] from a .jsonl file, a folder of them, or an hf: source."""
    if source.startswith("hf:"):
        from data.dataset import hf_rows

        rows = ((row, f"hf:{source[3:]} row {number}") for number, row in enumerate(hf_rows(source[3:], split, data_root), 1))
        return [(conversation_from_row(row, where), where) for row, where in rows]
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"input {source} not found (a .jsonl file, a folder of them, or hf:NAME)")
    conversations = []
    for file in [path] if path.is_file() else jsonl_files(path):
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"{file} is not UTF-8 text") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{file} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None
            conversations.append((conversation_from_row(row, where), where))
    if not conversations:
        raise UserError(f"no conversations found in {source}")
    return conversations


def validation_indices(count, val_fraction):
    """The conversations that validate: evenly spread (floor((i+1) f) steps up), and at least one."""
    fraction = Fraction(val_fraction).limit_denominator(1_000_000)
    if count < 2:
        raise UserError(f"{count} conversation: need at least 2, one to train on and one to validate")
    chosen = {i for i in range(count) if (i + 1) * fraction // 1 > i * fraction // 1}
    return chosen or {count - 1}


def marked_text(tokenizer, ids, mask):
    """The conversation's text with the trained tokens between ⟦ and ⟧."""
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            text = tokenizer.decode(ids[start:i])
            parts.append(f"{TRAINED_START}{text}{TRAINED_END}" if mask[start] else text)
            start = i
    return "".join(parts)


def chat_tokenizer(kind, conversations, vocab_size, tokenizer_file):
    """A tokenizer for --tokenizer=char|bpe|gpt2, built from the conversations' text as the
    default template writes it (the markers left out: they become special tokens)."""
    from data.dataset import build_tokenizer

    texts = [render_messages(DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt=False) for messages, _ in conversations]
    for marker in ("<|im_start|>", "<|im_end|>"):
        texts = [text.replace(marker, "") for text in texts]
    return build_tokenizer(kind, [(text, False, True) for text in texts], vocab_size, tokenizer_file)


def prepare_conversations(name, source, kind, why, vocab_size, tokenizer_file, split, val_fraction, data_root):
    """Render, encode, split and write data_root/name/ (see the module's docstring); the meta dict."""
    from data.dataset import token_dtype

    start_time = time.time()
    conversations = read_conversations(source, data_root, split)
    base = chat_tokenizer(kind, conversations, vocab_size, tokenizer_file) if isinstance(kind, str) else kind
    tokenizer = with_chat_template(base)
    if tokenizer is not base:
        why += f"; it has no chat template: the default ChatML one, its markers as {tokenizer.vocab_size - base.vocab_size} new ids"
    dtype = token_dtype(tokenizer.vocab_size)
    val = validation_indices(len(conversations), val_fraction)

    encoded = [[], []]  # per split: (ids, mask) of each conversation
    sha256 = hashlib.sha256()
    for index, (messages, where) in enumerate(tqdm(conversations, desc="encoding", unit="conversation", disable=None)):
        sha256.update(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        try:
            encoded[index in val].append(encode_conversation(tokenizer, messages))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None

    out_dir = Path(data_root) / name
    created = not out_dir.exists()
    counts = {}
    try:
        # As for text: every file replaces the old one only when all are written, and meta.json last.
        with contextlib.ExitStack() as files:
            for split_index, split_name in enumerate(("train", "val")):
                ids = np.asarray([i for c, _ in encoded[split_index] for i in c], dtype=dtype)
                mask = np.asarray([m for _, c in encoded[split_index] for m in c], dtype=np.uint8)
                starts = np.cumsum([0] + [len(c) for c, _ in encoded[split_index]][:-1]).astype(np.int64)
                for suffix, array in ((".bin", ids), ("_mask.bin", mask), ("_starts.bin", starts)):
                    with files.enter_context(atomic_write(out_dir / f"{split_name}{suffix}")) as f:
                        array.tofile(f)
                trained_bytes = sum(len(tokenizer.token_bytes(int(i))) for i in ids[mask == 1])
                counts[split_name] = {"conversations": len(encoded[split_index]), "tokens": len(ids),
                                      "trained_tokens": int(mask.sum()), "trained_bytes": trained_bytes,
                                      "bytes": len(tokenizer.decode_bytes(ids))}
            with files.enter_context(atomic_write(out_dir / "tokenizer.json", "w", encoding="utf-8")) as f:
                json.dump(tokenizer.to_dict(), f)
            (out_dir / "meta.json").unlink(missing_ok=True)
        meta = write_meta(
            out_dir, name, tokenizer, dtype, [counts[split]["tokens"] for split in ("train", "val")],
            [counts[split]["bytes"] for split in ("train", "val")], len(conversations), source, sha256.hexdigest(),
            "conversations",
            # the loss is taken on the trained tokens only (data/loader.py reads the mask)
            mask=True,
            **{f"{split}_{key}": value for split in ("train", "val")
               for key, value in counts[split].items() if key in ("conversations", "trained_tokens", "trained_bytes")})
    finally:
        if created and out_dir.exists() and not any(out_dir.iterdir()):
            out_dir.rmdir()

    say = lambda text: print(text, file=sys.stderr)  # noqa: E731
    say(f"one conversation as the model reads it, the trained tokens between {TRAINED_START} {TRAINED_END}:")
    say(marked_text(tokenizer, *(encoded[0][0] if encoded[0] else encoded[1][0])))
    for split_name, c in counts.items():
        say(f"  {split_name}: {c['conversations']:,} conversations, {c['tokens']:,} tokens, {c['trained_tokens']:,} "
            f"trained ({c['trained_tokens'] / max(1, c['tokens']):.0%}) -> {out_dir / (split_name + '.bin')} "
            f"+ {split_name}_mask.bin")
    say(f"prepared {out_dir} in {time.time() - start_time:.1f}s")
    say(f"tokenizer: {tokenizer.kind} with {tokenizer.vocab_size:,} ids, {why}")
    return meta
