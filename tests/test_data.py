"""Data preparation (text -> token files) and the batch loader (token files -> batches)."""

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import data.dataset as prepare_module
from data.loader import BatchLoader
from data.dataset import prepare, stdlib_files, token_dtype
from model.errors import UserError
from model.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent

POEM = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(40))


def read_split(data_dir, split):
    meta = json.loads((data_dir / "meta.json").read_text())
    return np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"])


def decoded_documents(data_dir, split):
    """The documents of a bpe/gpt2 split: its text cut at every <|endoftext|>."""
    tok = load_tokenizer(data_dir / "tokenizer.json")
    ids = read_split(data_dir, split).tolist()
    documents, current = [], []
    for i in ids:
        if i == tok.eos_id:
            documents.append(tok.decode(current))
            current = []
        else:
            current.append(i)
    assert not current, "every document ends with <|endoftext|>"
    return documents


def make_folder(root, count):
    """count documents in nested folders; sorted path order is doc00, doc01, ..."""
    texts = []
    for i in range(count):
        path = root / f"part{i // 7}" / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = f"document {i} says héllo ✓\n" * (i + 1)
        path.write_bytes(text.encode("utf-8"))
        texts.append(text)
    return texts


# ---------------------------------------------------------------- prepare


def test_file_prepares_train_and_val_that_decode_back_to_the_text(tmp_path, capsys):
    source = tmp_path / "poem.txt"
    source.write_text(POEM)
    meta = prepare("poem", input=str(source), tokenizer="char", data_root=str(tmp_path))
    data_dir = tmp_path / "poem"
    assert sorted(p.name for p in data_dir.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert json.loads((data_dir / "meta.json").read_text()) == meta
    tok = load_tokenizer(data_dir / "tokenizer.json")
    train, val = tok.decode(read_split(data_dir, "train")), tok.decode(read_split(data_dir, "val"))
    # One document: the text is cut at the 90% point, moved to just after the next newline.
    assert train + val == POEM and train.endswith("\n")
    assert len(POEM) * 0.9 <= len(train) < len(POEM) * 0.9 + 60
    assert meta["split_by"] == "text" and meta["documents"] == 1 and meta["eos_id"] is None
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == len(set(POEM)) and meta["source"] == str(source)
    assert "prepared" in capsys.readouterr().err  # diagnostics go to stderr


def test_meta_counts_match_the_token_files_and_the_source_bytes(tmp_path):
    source = tmp_path / "poem.txt"
    source.write_bytes(("naïve café 日本語 🙂\n" * 50).encode("utf-8"))
    meta = prepare("poem", input=str(source), tokenizer="char", data_root=str(tmp_path))
    data_dir = tmp_path / "poem"
    for split in ("train", "val"):
        assert (data_dir / f"{split}.bin").stat().st_size == meta[f"{split}_tokens"] * 2
    # Char tokens are characters, bytes are UTF-8 bytes: multi-byte characters make them differ.
    assert meta["train_bytes"] + meta["val_bytes"] == source.stat().st_size
    assert meta["train_tokens"] + meta["val_tokens"] == len(source.read_text(encoding="utf-8"))
    import hashlib
    assert meta["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert meta["dtype"] == "uint16"


def test_folder_is_split_by_document_every_tenth_to_val_with_eot_after_each(tmp_path, capsys):
    texts = make_folder(tmp_path / "corpus", 20)
    (tmp_path / "corpus" / "part0" / "image.bin").write_bytes(b"\x89PNG\x00\x01\x02")  # skipped, with a note
    (tmp_path / "corpus" / ".hidden.txt").write_text("never read")
    meta = prepare("docs", input=str(tmp_path / "corpus"), tokenizer="bpe", vocab_size=300,
                   data_root=str(tmp_path))
    assert "image.bin" in capsys.readouterr().err
    data_dir = tmp_path / "docs"
    assert meta["documents"] == 20 and meta["split_by"] == "documents"
    assert decoded_documents(data_dir, "val") == [texts[9], texts[19]]
    assert decoded_documents(data_dir, "train") == [t for i, t in enumerate(texts) if i % 10 != 9]
    # <|endoftext|> separators carry no text: the byte counts add up to the files' bytes alone.
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert meta["eos_id"] == meta["vocab_size"] - 1  # a tiny corpus may run out of merges before 300
    assert meta["train_tokens"] == read_split(data_dir, "train").size


def test_val_fraction_other_than_a_tenth_spreads_val_documents_evenly(tmp_path):
    texts = make_folder(tmp_path / "corpus", 12)
    prepare("quarter", input=str(tmp_path / "corpus"), tokenizer="bpe", vocab_size=260,
            val_fraction=0.25, data_root=str(tmp_path))
    assert decoded_documents(tmp_path / "quarter", "val") == [texts[3], texts[7], texts[11]]


def test_a_document_cut_by_the_text_split_keeps_one_eot_at_its_true_end(tmp_path):
    source = tmp_path / "poem.txt"
    source.write_text(POEM)
    prepare("poem", input=str(source), tokenizer="bpe", vocab_size=280, data_root=str(tmp_path))
    tok = load_tokenizer(tmp_path / "poem" / "tokenizer.json")
    train, val = read_split(tmp_path / "poem", "train").tolist(), read_split(tmp_path / "poem", "val").tolist()
    assert tok.eos_id not in train and val[-1] == tok.eos_id and val.count(tok.eos_id) == 1
    assert tok.decode(train) + tok.decode(val[:-1]) == POEM


def test_long_documents_are_encoded_in_parts_without_changing_a_single_id(tmp_path, monkeypatch):
    # Newlines in every neighbourhood: after spaces, doubled, \r\n, tabs, before punctuation.
    text = "".join(f"def f{i}(x):\n    return x  \n\n\tz = {i}\r\n# note\n.end\n" for i in range(300))
    source = tmp_path / "long.txt"
    source.write_bytes(text.encode("utf-8"))
    for kind in ("bpe", "char"):
        whole = prepare("whole", input=str(source), tokenizer=kind, vocab_size=400, data_root=str(tmp_path))
        monkeypatch.setattr(prepare_module, "PIECE_CHARS", 50)
        parts = prepare("parts", input=str(source), tokenizer=kind, vocab_size=400, data_root=str(tmp_path))
        monkeypatch.undo()
        assert whole["train_tokens"] == parts["train_tokens"] and whole["val_tokens"] == parts["val_tokens"]
        for name in ("train.bin", "val.bin", "tokenizer.json"):
            assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "parts" / name).read_bytes()
    assert len(prepare_module.cut_long_pieces([(text, False, True)])) == 1
    monkeypatch.setattr(prepare_module, "PIECE_CHARS", 50)
    parts = prepare_module.cut_long_pieces([(text, False, True)])
    assert len(parts) > 100 and "".join(p[0] for p in parts) == text
    assert [p[2] for p in parts] == [False] * (len(parts) - 1) + [True]


def test_local_jsonl_and_parquet_are_read_through_the_datasets_library(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"row {i}: some text ✓\n", "id": i} for i in range(30)]
    rows[4]["text"] = None  # missing text is skipped
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "hub_copy"
    folder.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "train-00000-of-00001.parquet"))

    kept = [r["text"] for r in rows if r["text"]]
    for source in (f"hf:{jsonl}", f"hf:{folder}", f"hf:{folder / 'train-00000-of-00001.parquet'}"):
        meta = prepare("rows", input=source, tokenizer="char", data_root=str(tmp_path))
        assert meta["documents"] == 29 and meta["source"] == source
        tok = load_tokenizer(tmp_path / "rows" / "tokenizer.json")
        val = tok.decode(read_split(tmp_path / "rows", "val"))
        assert val == kept[9] + kept[19]  # every 10th document, as for a folder
    assert "datasets" in sys.modules

    # --max_bytes caps what is read; the row that crosses the cap is cut at the cap.
    meta = prepare("rows", input=f"hf:{jsonl}", tokenizer="char", max_bytes=100, data_root=str(tmp_path))
    assert meta["train_bytes"] + meta["val_bytes"] == 100
    with pytest.raises(UserError, match="no column 'body'.*columns: text, id"):
        prepare("rows", input=f"hf:{jsonl}", text_field="body", data_root=str(tmp_path))


def test_token_files_are_uint32_only_when_ids_do_not_fit_16_bits(tmp_path):
    assert token_dtype(256) == np.uint16 and token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32 and token_dtype(50257) == np.uint16
    # 70,000 distinct characters: a char vocabulary too big for 16-bit ids.
    chars = [chr(c) for c in range(0x100, 0x100 + 75_000) if not 0xD800 <= c <= 0xDFFF][:70_000]
    source = tmp_path / "wide.txt"
    source.write_text("".join(chars) + "\n" + "".join(chars[:1000]) + "\n", encoding="utf-8")
    meta = prepare("wide", input=str(source), tokenizer="char", data_root=str(tmp_path))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001  # + the newline
    assert (tmp_path / "wide" / "train.bin").stat().st_size == meta["train_tokens"] * 4
    loader = BatchLoader(tmp_path / "wide", "train", batch_size=2, block_size=8, seed=0)
    assert int(loader.next_batch()[0].max()) < 70_000


def test_url_is_downloaded_once_into_the_cache(tmp_path):
    served = tmp_path / "site"
    served.mkdir()
    (served / "input.txt").write_text(POEM)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/input.txt"
    try:
        first = prepare("web", input=url, data_root=str(tmp_path))
    finally:
        server.shutdown()
        server.server_close()
    cached = list((tmp_path / ".cache").glob("*-input.txt"))
    assert len(cached) == 1 and cached[0].read_text() == POEM
    second = prepare("web", input=url, data_root=str(tmp_path))  # server is gone: the cache answers
    assert first == second and first["source"] == url


def test_unreachable_url_says_to_pass_a_file(tmp_path):
    with pytest.raises(UserError, match="--input=FILE"):
        prepare("web", input="http://127.0.0.1:9/input.txt", data_root=str(tmp_path))
    assert not (tmp_path / "web").exists()


def test_pystdlib_is_the_standard_library_without_its_tests(tmp_path):
    root, files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    for path in files:
        parts = path.relative_to(root).parts
        assert path.suffix == ".py" and "site-packages" not in parts
        assert not any(p in ("test", "tests", "idle_test", "__pycache__") or p.startswith("test") for p in parts)
    meta = prepare("pystdlib", max_bytes=300_000, data_root=str(tmp_path))  # the cap keeps this test quick
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] <= 1024  # its default: a 1024-id BPE
    assert meta["split_by"] == "documents" and meta["documents"] >= 10
    assert meta["train_bytes"] + meta["val_bytes"] == 300_000


# ---------------------------------------------------------------- the command line


def run_cli(*args):
    return subprocess.run([sys.executable, "data/prepare.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_prepares_a_file_from_the_repo_root(tmp_path):
    source = tmp_path / "poem.txt"
    source.write_text(POEM)
    result = run_cli("poem", f"--input={source}", "--tokenizer=char", f"--data_root={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "train:" in result.stderr and "val:" in result.stderr
    meta = json.loads((tmp_path / "poem" / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == len(POEM)


def test_cli_bad_input_is_one_error_line_and_leaves_existing_data_alone(tmp_path):
    source = tmp_path / "poem.txt"
    source.write_text(POEM)
    assert run_cli("keep", f"--input={source}", f"--data_root={tmp_path}").returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "keep").iterdir()}

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "short.txt").write_text("ab c")  # val would be one token
    (tmp_path / "one_line.txt").write_text("just one line\n")  # nothing after the last newline
    (tmp_path / "new_chars.txt").write_text("zzz QQQ !!!\n" * 20)
    bad_runs = [
        ["keep", f"--input={tmp_path / 'missing.txt'}"],
        ["keep", f"--input={tmp_path / 'empty.txt'}"],
        ["keep", f"--input={tmp_path / 'empty_folder'}"],
        ["keep", f"--input={source}", "--tokenizer=morse"],
        ["keep", f"--input={source}", "--val_fraction=1.5"],
        ["keep", f"--input={tmp_path / 'short.txt'}"],
        ["keep", f"--input={tmp_path / 'one_line.txt'}"],
        ["keep", f"--input={source}", "--tokenizer=bpe", "--vocab_size=100"],
        ["keep", f"--input={source}", "--no_such_option=1"],
        ["not_builtin"],
        ["../escape", f"--input={source}"],
        [],
        # Fails while encoding, after the token files were started: the old ones must survive.
        ["keep", f"--input={tmp_path / 'new_chars.txt'}", f"--tokenizer_file={tmp_path / 'keep' / 'tokenizer.json'}"],
    ]
    for args in bad_runs:
        result = run_cli(*args, f"--data_root={tmp_path}")
        lines = result.stderr.splitlines()
        assert result.returncode == 2, (args, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        assert "Traceback" not in result.stdout + result.stderr
    after = {p.name: p.read_bytes() for p in (tmp_path / "keep").iterdir()}
    assert after == before  # same files, same bytes, no temporary leftovers
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["empty_folder", "keep"]


# ---------------------------------------------------------------- the loader


def make_dataset(root, train_tokens=5000, val_tokens=500, dtype="uint16"):
    """A prepared dataset whose tokens are 0, 1, 2, ...: a window's start says where it came from."""
    root.mkdir(parents=True, exist_ok=True)
    np.arange(train_tokens, dtype=dtype).tofile(root / "train.bin")
    np.arange(val_tokens, dtype=dtype).tofile(root / "val.bin")
    meta = {"name": root.name, "tokenizer": "char", "vocab_size": train_tokens, "dtype": dtype,
            "train_tokens": train_tokens, "val_tokens": val_tokens}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def batches(loader, count):
    return [loader.next_batch() for _ in range(count)]


def test_batches_are_int64_windows_with_targets_shifted_by_one(tmp_path):
    loader = BatchLoader(make_dataset(tmp_path / "d"), "train", batch_size=4, block_size=16, seed=1)
    x, y = loader.next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)  # tokens are 0, 1, 2...: the target is the next token
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)
    assert int(y.max()) < 5000


def test_same_seed_gives_the_same_batches_and_another_seed_does_not(tmp_path):
    data = make_dataset(tmp_path / "d")
    a = batches(BatchLoader(data, "train", 4, 16, seed=7), 3)
    b = batches(BatchLoader(data, "train", 4, 16, seed=7), 3)
    c = batches(BatchLoader(data, "train", 4, 16, seed=8), 3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))
    assert not torch.equal(a[0][0], a[1][0])  # each step draws new windows


def test_two_ranks_with_batch_b_read_exactly_what_one_rank_with_batch_2b_reads(tmp_path):
    data = make_dataset(tmp_path / "d")
    single = batches(BatchLoader(data, "train", 8, 16, seed=3), 4)
    rank0 = batches(BatchLoader(data, "train", 4, 16, seed=3, rank=0, world_size=2), 4)
    rank1 = batches(BatchLoader(data, "train", 4, 16, seed=3, rank=1, world_size=2), 4)
    for whole, r0, r1 in zip(single, rank0, rank1):
        assert torch.equal(whole[0], torch.cat([r0[0], r1[0]]))
        assert torch.equal(whole[1], torch.cat([r0[1], r1[1]]))


def test_grad_accum_two_with_batch_b_equals_one_step_of_batch_2b(tmp_path):
    data = make_dataset(tmp_path / "d")
    whole = batches(BatchLoader(data, "train", 8, 16, seed=5), 3)
    micro = batches(BatchLoader(data, "train", 4, 16, seed=5, grad_accum=2), 6)
    for step in range(3):
        assert torch.equal(whole[step][0], torch.cat([micro[2 * step][0], micro[2 * step + 1][0]]))
    # Both together: 2 ranks x grad_accum 2 x batch 2 cover the 8 rows of a step, rank-major per micro-step.
    ranks = [batches(BatchLoader(data, "train", 2, 16, seed=5, rank=r, world_size=2, grad_accum=2), 2)
             for r in (0, 1)]
    rows = torch.cat([ranks[0][0][0], ranks[1][0][0], ranks[0][1][0], ranks[1][1][0]])
    assert torch.equal(whole[0][0], rows)


def test_resume_from_state_dict_continues_exactly(tmp_path):
    data = make_dataset(tmp_path / "d")
    straight = BatchLoader(data, "train", 4, 16, seed=2, grad_accum=3)
    expected = batches(straight, 10)
    first = BatchLoader(data, "train", 4, 16, seed=2, grad_accum=3)
    batches(first, 4)  # stop in the middle of an optimizer step
    state = first.state_dict()
    assert state == {"step": 1, "micro_step": 1} and all(type(v) is int for v in state.values())
    resumed = BatchLoader(data, "train", 4, 16, seed=2, grad_accum=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for want, got in zip(expected[4:], batches(resumed, 6)):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_eval_batch_is_the_same_every_time_and_not_a_training_batch(tmp_path):
    data = make_dataset(tmp_path / "d")
    loader = BatchLoader(data, "val", 4, 16, seed=0)
    first = [loader.eval_batch(i)[0] for i in range(3)]
    batches(loader, 5)
    again = [BatchLoader(data, "val", 4, 16, seed=0).eval_batch(i)[0] for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], BatchLoader(data, "val", 4, 16, seed=0).next_batch()[0])
    halves = [BatchLoader(data, "val", 2, 16, seed=0, rank=r, world_size=2).eval_batch(0)[0] for r in (0, 1)]
    assert torch.equal(first[0], torch.cat(halves))


def test_split_shorter_than_a_block_is_refused_clearly(tmp_path):
    data = make_dataset(tmp_path / "d", val_tokens=16)
    with pytest.raises(UserError, match="val split .* 16 tokens, fewer than block_size \\+ 1 = 17"):
        BatchLoader(data, "val", 4, 16, seed=0)
    x, y = BatchLoader(data, "val", 4, 15, seed=0).next_batch()  # exactly block_size + 1 tokens is enough
    assert torch.equal(x[0], torch.arange(15)) and torch.equal(y[0], torch.arange(1, 16))
    with pytest.raises(UserError, match="no prepared dataset"):
        BatchLoader(tmp_path / "nothing", "train", 4, 16, seed=0)


def test_loader_reads_what_prepare_wrote(tmp_path):
    source = tmp_path / "poem.txt"
    source.write_text(POEM)
    prepare("poem", input=str(source), tokenizer="char", data_root=str(tmp_path))
    tok = load_tokenizer(tmp_path / "poem" / "tokenizer.json")
    x, y = BatchLoader(tmp_path / "poem", "train", 2, 32, seed=0).next_batch()
    assert tok.decode(x[0].tolist()) in POEM and tok.decode(x[0].tolist())[1:] == tok.decode(y[0].tolist())[:-1]
