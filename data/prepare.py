"""Turn text into token files: data/NAME/{train.bin, val.bin, tokenizer.json, meta.json}.

    python data/prepare.py NAME [--input=SOURCE] [--tokenizer=char|bpe|gpt2|hf:MODEL|FILE.gguf|OUT_DIR] [--vocab_size=N]
        [--tokenizer_file=F] [--split=train] [--text_field=text] [--max_bytes=N]
        [--val_fraction=0.1] [--data_root=data]

SOURCE is one of
    path/to/file.txt          one UTF-8 text file: one document
    path/to/folder            every file under it, recursively, in sorted order, one document each
                              (hidden files are skipped; binary or non-UTF-8 files too, with a note)
    https://host/file.txt     downloaded once into DATA_ROOT/.cache/, then read as a file
    hf:owner/name             a Hugging Face dataset, streamed with the `datasets` library from its
    hf:owner/name:subset      plain data files (parquet/json/text; never a loading script); --split
                              picks the split, --text_field the column, --max_bytes caps the download
    hf:/local/folder          local data read through the same `datasets` library, fully offline: a
    hf:/local/file.parquet    folder (format and splits inferred from its files, e.g. a downloaded
    hf:/local/file.jsonl      dataset repository) or one .parquet/.json/.jsonl/.csv/.txt file
                              (a single file is one split; --split is not used). A path wins over a
                              hub name when it exists on disk.
    python:stdlib             the pystdlib corpus below (to prepare it under another name)

Conversations (a .jsonl file, a folder of .jsonl files, or hf: rows with a `messages` column, or
`instruction` + `output` columns) are rendered with the model's chat template into tokens plus a
loss mask (1 on the assistant's tokens): see data/conversations.py.
    python data/prepare.py faq --input=faq.jsonl --tokenizer=hf:HuggingFaceTB/SmolLM2-135M-Instruct

Built-in names need no --input:
    pystdlib          the .py files of the running Python's standard library (tests excluded): the
                      default corpus, on every machine with Python, no download. bpe tokenizer, 1024 ids.
    shakespeare_char  Tiny Shakespeare (downloaded, or --input=FILE), char tokenizer
    shakespeare       Tiny Shakespeare, GPT-2 tokenizer
An explicit --input or --tokenizer overrides the built-in's default.

Tokenizers: char (one id per distinct character of the whole text; the default for a new NAME), bpe
(our byte-level BPE trained on the train split, --vocab_size ids), gpt2 (GPT-2's own, through tiktoken;
--tokenizer_file=gpt2.tiktoken works offline). To fine-tune a model, prepare its data with the model's
own tokenizer: --tokenizer=hf:<folder or owner/name> takes a Hugging Face model's tokenizer.json
(hf:gpt2 for GPT-2 imported with --init_from=gpt2), --tokenizer=<path>.gguf a GGUF file's vocabulary,
--tokenizer=<path to ckpt.pt or an out_dir> the tokenizer of a model trained here. For char and bpe, --tokenizer_file=tokenizer.json reuses a saved
tokenizer instead of building one.

Split: with at least 10 documents, validation takes an evenly spread val_fraction of them (for 0.1:
every 10th document, index % 10 == 9), so no document is cut in two. With fewer documents the text is
cut at the (1 - val_fraction) point, moved forward to just after the next newline.

Documents are joined with <|endoftext|> for bpe and gpt2 (one after each document) and simply
concatenated for char. meta.json's train_bytes / val_bytes count the UTF-8 bytes of the text in each
split (the end-of-text tokens count zero bytes), so train_bytes + val_bytes is the size of the source
text and val loss converts to bits per byte. sha256 is the hash of the documents' UTF-8 bytes
concatenated in order (for a single file: the file's own sha256). meta.json is written last: a folder
with a meta.json is complete, and a failed run leaves an earlier preparation untouched.
"""

import sys
from pathlib import Path

# Run as `python data/prepare.py`, Python puts data/ on sys.path, not the repo root that holds model/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataclasses  # noqa: E402

from data.dataset import BUILTINS, prepare  # noqa: E402
from model.cli import field, main_guard, parse_config  # noqa: E402
from model.errors import UserError  # noqa: E402


@dataclasses.dataclass
class PrepareConfig:
    input: str = field("", "file, folder, http(s) URL, hf:owner/name or hf:/local/path (built-in names need none)")
    tokenizer: str = field("", "char, bpe, gpt2, hf:<folder or owner/name>, a .gguf file, or a ckpt.pt / out_dir to reuse its "
                               "model's tokenizer (default: the built-in's, else char)")
    vocab_size: int = field(0, "number of token ids for --tokenizer=bpe (0 = the built-in's default, else 4096)")
    tokenizer_file: str = field("", "gpt2: a gpt2.tiktoken file (offline); char/bpe: a saved tokenizer.json to reuse")
    split: str = field("train", "split of an hf: dataset to read")
    text_field: str = field("text", "column of an hf: dataset that holds the text")
    max_bytes: int = field(0, "stop reading after this many bytes of text (0 = no limit)")
    val_fraction: float = field(0.1, "share of the data held out for validation")
    data_root: str = field("data", "folder that holds prepared datasets (and .cache/ for downloads)")


USAGE = ("usage: python data/prepare.py NAME [--input=SOURCE] [--tokenizer=char|bpe|gpt2|hf:MODEL|FILE.gguf|OUT_DIR] [--options]\n"
         f"built-in NAMEs (no --input needed): {', '.join(BUILTINS)}; SOURCE forms: see data/prepare.py")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    flags = [a for a in argv if a.startswith("-")]
    config = parse_config(PrepareConfig, flags, USAGE)  # handles --help before NAME is required
    positional = [a for a in argv if not a.startswith("-")]
    if len(positional) != 1:
        raise UserError(f"expected one dataset NAME (e.g. pystdlib), got {len(positional)} (see --help)")
    prepare(positional[0], input=config.input or None, tokenizer=config.tokenizer or None,
            vocab_size=config.vocab_size, tokenizer_file=config.tokenizer_file or None, split=config.split,
            text_field=config.text_field, max_bytes=config.max_bytes, val_fraction=config.val_fraction,
            data_root=config.data_root)


if __name__ == "__main__":
    main_guard(main)
