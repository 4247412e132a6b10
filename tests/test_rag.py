"""rag.py and its pieces: chunks, BM25 by hand, the encoder against transformers' BertModel,
retrieval of a planted fact, the prompt ask sends, eval's figures, and bad input."""

import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, run_script
from data.retrieval import BM25, chunk_document, count_tokens, fuse_ranks, term_shares
from model.files import atomic_folder

PLANTED = "The harbour master keeps the brass telescope in the lighthouse cellar."
FILLER = {
    "fruit.txt": "Apples and pears grow in the orchard.\nThe orchard is old.\n\nPears ripen late in autumn.\n",
    "trains.md": "# Trains\n\nThe night train leaves at ten.\nIt stops at every station.\n",
    "code.py": "def add(a, b):\n    \"\"\"Return the sum of two numbers.\"\"\"\n    return a + b\n",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of text, markdown and Python files; notes/harbour.txt holds the planted fact."""
    root = tmp_path_factory.mktemp("corpus") / "docs"
    (root / "notes").mkdir(parents=True)
    for name, text in FILLER.items():
        (root / name).write_text(text)
    lines = [f"Line {i} of the harbour log: the tide was ordinary." for i in range(1, 8)]
    (root / "notes" / "harbour.txt").write_text("\n".join(lines[:4] + ["", PLANTED, ""] + lines[4:]) + "\n")
    (root / "image.png").write_bytes(b"\x89PNG\0\0")  # not a text file: skipped
    return root


def tiny_bert(folder, seed, pooling="mean"):
    """A random BertModel saved by transformers, with a WordPiece tokenizer.json made by the
    tokenizers library (BERT's normaliser, pre-tokeniser and [CLS] ... [SEP] template)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(folder)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    texts = [PLANTED, *FILLER.values(), "the tide was ordinary line of harbour log"]
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.save(str(folder / "tokenizer.json"))
    if pooling == "cls":
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    return folder


@pytest.fixture(scope="module")
def berts(tmp_path_factory):
    root = tmp_path_factory.mktemp("berts")
    return tiny_bert(root / "bert_a", seed=0), tiny_bert(root / "bert_b", seed=1, pooling="cls")


@pytest.fixture(scope="module")
def dense_index(corpus, berts):
    index = corpus.parent / "dense_index"
    run_script("rag.py", "index", str(corpus), f"--index={index}", f"--embedder=hf:{berts[0]}", "--chunk_tokens=30",
               "--overlap=5")
    return index


# ---- the pieces -----------------------------------------------------------------------------

def test_bm25_scores_equal_a_hand_computation():
    texts = ["cat sat on the mat", "dog sat", "cat cat cat dog bird"]
    bm25 = BM25(texts, k1=1.5, b=0.75)
    scores, shares = bm25.scores("Cat dog")
    # by hand: N = 3, average length (5 + 2 + 5) / 3 = 4; "cat" is in 2 chunks, "dog" in 2
    idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))

    def share(tf, length):
        return idf * tf * 2.5 / (tf + 1.5 * (1 - 0.75 + 0.75 * length / 4))

    expected = [share(1, 5), share(1, 2), share(3, 5) + share(1, 5)]
    assert np.allclose(scores, expected)
    assert term_shares(shares, 2) == pytest.approx({"cat": share(3, 5), "dog": share(1, 5)})
    assert term_shares(shares, 1) == pytest.approx({"dog": share(1, 2)})
    assert bm25.scores("unicorn")[0].tolist() == [0, 0, 0]


def test_reciprocal_rank_fusion_adds_one_over_60_plus_rank():
    fused = fuse_ranks([[7, 3], [3, 9]])
    assert fused == pytest.approx({7: 1 / 61, 3: 1 / 62 + 1 / 61, 9: 1 / 62})


def test_chunks_cut_at_paragraphs_and_keep_their_lines():
    paragraphs = ["\n".join(f"paragraph {p} line {i} has some words" for i in range(4)) for p in range(5)]
    text = "\n\n".join(paragraphs) + "\n" + "one very long line " * 40
    lines = text.splitlines()
    chunks = chunk_document("doc.txt", text, chunk_tokens=30, overlap=6)
    for chunk in chunks:
        first, last = chunk["lines"]
        assert count_tokens(chunk["text"]) <= 30
        if first != last:  # a whole run of lines, exactly as in the source
            assert chunk["text"] == "\n".join(lines[first - 1:last]).strip("\n")
    # each 28-token paragraph is a chunk of its own: the cuts fall on the blank lines
    assert [c["lines"] for c in chunks[:5]] == [[1, 4], [6, 9], [11, 14], [16, 19], [21, 24]]
    long_line = [c for c in chunks if c["lines"] == [25, 25]]
    assert len(long_line) == 6 and " ".join(c["text"] for c in long_line).split() == lines[24].split()
    # cut inside a paragraph, the next chunk repeats up to `overlap` tokens of whole lines
    inside = chunk_document("doc.txt", "\n".join(f"w{i} x y" for i in range(20)), chunk_tokens=9, overlap=3)
    assert [c["lines"] for c in inside[:3]] == [[1, 3], [3, 5], [5, 7]]


def test_atomic_folder_keeps_the_old_folder_when_the_new_one_fails(tmp_path):
    target = tmp_path / "idx"
    with atomic_folder(target) as new:
        (tmp_path / "idx.txt").write_text("unrelated")
        open(os.path.join(new, "a"), "w").write("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as new:
            open(os.path.join(new, "a"), "w").write("new")
            raise RuntimeError("disk full")
    assert (target / "a").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["idx", "idx.txt"]


def test_encoder_equals_transformers_bert_with_mean_and_cls_pooling(berts):
    from transformers import BertModel

    from model.encoder import embed, load_encoder

    texts = ["The harbour master keeps the telescope.", "Pears.", "the night train leaves at ten and stops"]
    for folder in berts:
        encoder, tokenizer, description = load_encoder(f"hf:{folder}")
        ours, truncated = embed(encoder, tokenizer, texts, batch_size=3)  # padded to the longest
        reference = BertModel.from_pretrained(folder).eval()
        encodings = [tokenizer.encode(t) for t in texts]
        longest = max(len(e.ids) for e in encodings)
        ids = torch.tensor([e.ids + [0] * (longest - len(e.ids)) for e in encodings])
        mask = (torch.arange(longest)[None] < torch.tensor([len(e.ids) for e in encodings])[:, None]).long()
        with torch.no_grad():
            hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        if description["pooling"] == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        expected = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        assert np.abs(ours - expected).max() < 1e-5
        assert truncated == 0 and np.allclose(np.linalg.norm(ours, axis=1), 1)
    assert [load_encoder(f"hf:{f}")[2]["pooling"] for f in berts] == ["mean", "cls"]


# ---- through rag.py -------------------------------------------------------------------------

def search(index, question, *flags):
    result = run_script("rag.py", "search", question, f"--index={index}", "--json", *flags)
    return json.loads(result.stdout)


def test_bm25_search_finds_the_planted_fact_with_its_lines_and_terms(corpus, tmp_path):
    index = tmp_path / "idx"
    result = run_script("rag.py", "index", str(corpus), f"--index={index}", "--chunk_tokens=30", "--overlap=5")
    assert "read 4 documents" in result.stdout
    rows = [json.loads(line) for line in (index / "chunks.jsonl").read_text().splitlines()]
    assert all({"id", "source", "lines", "text"} <= set(row) for row in rows)
    found = search(index, "Where is the brass telescope kept?", "--top=3")
    assert found["retriever"] == "bm25" and found["chunks"] == len(rows)
    best = found["results"][0]
    assert best["source"].endswith("notes/harbour.txt") and PLANTED in best["text"]
    # the chunk starts at the planted paragraph (the one before ends at the blank line above it)
    assert best["lines"] == [6, 8] and best["text"].startswith(PLANTED)
    assert set(best["bm25_terms"]) == {"brass", "telescope", "the"}  # the query's words this chunk holds
    assert best["score"] == pytest.approx(sum(best["bm25_terms"].values()))
    text = run_script("rag.py", "search", "brass telescope", f"--index={index}").stdout
    assert "notes/harbour.txt:6-8" in text and "bm25" in text and "telescope" in text


def test_dense_and_hybrid_search_score_a_chunk_by_its_cosine(dense_index):
    rows = [json.loads(line) for line in (dense_index / "chunks.jsonl").read_text().splitlines()]
    embeddings = np.load(dense_index / "embeddings.npy")
    assert embeddings.shape == (len(rows), 32) and np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    planted = next(row for row in rows if PLANTED in row["text"])
    found = search(dense_index, planted["text"], "--retriever=dense")
    assert found["results"][0]["id"] == planted["id"] and found["results"][0]["cosine"] == pytest.approx(1, abs=1e-5)
    # the cosine shown is the dot product of the stored row and the query's embedding
    second = found["results"][1]
    assert second["cosine"] == pytest.approx(float(embeddings[second["id"]] @ embeddings[planted["id"]]), abs=1e-5)
    hybrid = search(dense_index, planted["text"])  # auto: hybrid on an index with embeddings
    assert hybrid["retriever"] == "hybrid" and hybrid["results"][0]["id"] == planted["id"]
    assert hybrid["results"][0]["score"] == pytest.approx(2 / 61)  # first in both rankings


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, corpus):
    """A tiny random model with a byte-level BPE and its own chat template, as a checkpoint."""
    from model.checkpoint import checkpoint_of, save_checkpoint
    from model.gpt import GPT, GPTConfig
    from model.tokenizer import train_bpe

    texts = [p.read_text() for p in sorted(corpus.rglob("*")) if p.suffix in (".txt", ".md", ".py")]
    tokenizer = train_bpe(texts, vocab_size=300)
    tokenizer.chat_template = ("{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}<</{{ m['role'] }}>>\n"
                               "{% endfor %}{% if add_generation_prompt %}<<assistant>>{% endif %}")
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="llama", vocab_size=tokenizer.vocab_size, block_size=512, n_layer=2, n_head=2,
                          n_embd=32))
    for matrix in (p for p in model.parameters() if p.dim() == 2):
        torch.nn.init.normal_(matrix, std=0.3)  # far from uniform: what the context says changes the numbers
    path = tmp_path_factory.mktemp("model") / "ckpt.pt"
    save_checkpoint(checkpoint_of(model, tokenizer), path)
    return path


def test_ask_prompt_holds_the_retrieved_chunks_in_the_chat_template(corpus, chat_model, tmp_path):
    index = tmp_path / "idx"
    run_script("rag.py", "index", str(corpus), f"--index={index}", "--chunk_tokens=30", "--overlap=5")
    common = [f"--index={index}", f"--init_from={chat_model}", "--max_new_tokens=6", "--device=cpu"]
    out = run_script("rag.py", "ask", "Where is the brass telescope?", "--top=2", *common).stdout
    prompt = out.split("== prompt:")[1].split("== answer:")[0]
    assert prompt.splitlines()[1].startswith("<<user>>Answer the question using the context below.")
    assert f"[1] {corpus}/notes/harbour.txt:6-8\n{PLANTED}" in prompt
    assert "Question: Where is the brass telescope?<</user>>\n<<assistant>>" in prompt
    assert "1. " + str(corpus / "notes" / "harbour.txt") + ":6-8  bm25" in out  # the ranked chunks, shown first
    table = out.split("without      ratio\n")[1].strip().splitlines()
    answer_tokens = int(out.split("== rag: prompt")[1].split("answer ")[1].split(" tokens")[0])
    assert len(table) == answer_tokens + 1 and "times as likely" in table[-1]
    # the first answer token is the greedy one: its probability with the context is the largest
    # after the prompt as printed, and without it, that token's after the question alone
    from model.chat import encode_chat
    from model.checkpoint import load_model

    model, tokenizer, _ = load_model(str(chat_model), None)
    shown = out.split("exactly as the model reads it:\n")[1].split("\n== answer:")[0]
    with torch.no_grad():
        p_with = model(torch.tensor([tokenizer.encode(shown, allow_special=True)]))[0][0, -1].softmax(-1)
        bare = encode_chat(tokenizer, [{"role": "user", "content": "Where is the brass telescope?"}])
        p_without = model(torch.tensor([bare]))[0][0, -1].softmax(-1)
    first = table[0].split()
    assert float(first[-3]) == pytest.approx(p_with.max().item(), abs=1e-4)
    assert float(first[-2]) == pytest.approx(p_without[p_with.argmax()].item(), abs=1e-4)
    assert float(first[-3]) != pytest.approx(float(first[-2]), abs=1e-3)  # the context moved it
    alone = run_script("rag.py", "ask", "Where is the brass telescope?", *common, "--no_retrieval").stdout
    assert PLANTED not in alone and "<<user>>Where is the brass telescope?<</user>>" in alone
    stuffed = run_script("rag.py", "ask", "Where is the brass telescope?", *common, "--stuff",
                         "--context_tokens=400").stdout
    length = int(stuffed.split("== prompt:")[1].split(" tokens")[0].replace(",", ""))
    assert 300 < length <= 400 - 6 and PLANTED in stuffed


def write_rows(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_eval_figures_on_a_tiny_set(corpus, chat_model, tmp_path):
    index = tmp_path / "idx"
    run_script("rag.py", "index", str(corpus), f"--index={index}", "--chunk_tokens=30", "--overlap=5")
    questions = write_rows(tmp_path / "q.jsonl", [
        {"question": "brass telescope", "answer": "cellar", "source": "notes/harbour.txt"},  # rank 1
        {"question": "orchard station", "answer": "ten", "source": "trains.md"},  # fruit.txt says orchard twice
        {"question": "unicorn", "answer": "none", "source": "code.py"},  # no chunk has the word
    ])
    figures = json.loads(run_script("rag.py", "eval", str(questions), f"--index={index}", "--json").stdout)
    assert figures == pytest.approx({"recall@1": 1 / 3, "recall@3": 2 / 3, "recall@5": 2 / 3, "mrr": (1 + 1 / 2) / 3})
    with_model = json.loads(run_script("rag.py", "eval", str(questions), f"--index={index}", "--json",
                                       f"--init_from={chat_model}", "--max_new_tokens=4",
                                       "--context_tokens=300").stdout)
    assert set(with_model) == {"recall@1", "recall@3", "recall@5", "mrr", "accuracy_rag", "accuracy_none",
                               "accuracy_stuff", "seconds_per_question_rag", "seconds_per_question_none",
                               "seconds_per_question_stuff"}
    assert all(with_model[f"accuracy_{m}"] * 3 in (0, 1, 2, 3) for m in ("rag", "none", "stuff"))
    assert all(with_model[f"seconds_per_question_{m}"] > 0 for m in ("rag", "none", "stuff"))


def test_make_eval_builds_questions_from_docstrings(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "shapes.py").write_text(
        'def circle_area(r):\n    """Compute the surface enclosed by a round figure. More text."""\n\n'
        'def square_area(s):\n    """The square_area says its own name, so it is no fair question."""\n\n'
        'def _hidden(x):\n    """A private helper is never asked about at all."""\n')
    (package / "other.py").write_text('class Box:\n    def volume_of(self):\n        """Multiply the three '
                                      'sides of this container together."""\n')
    out = tmp_path / "q.jsonl"
    run_script("rag.py", "make_eval", str(package), f"--out={out}")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["answer"], r["source"]) for r in rows} == {("circle_area", "pkg/shapes.py"),
                                                          ("volume_of", "pkg/other.py")}
    assert '"Compute the surface enclosed by a round figure."' in rows[-1]["question"] + rows[0]["question"]


# ---- bad input ------------------------------------------------------------------------------

def char_model(path):
    """A tiny model whose tokenizer knows only printable ASCII: a '€' cannot be encoded."""
    from model.checkpoint import checkpoint_of, save_checkpoint
    from model.gpt import GPT, GPTConfig
    from model.tokenizer import CharTokenizer

    tokenizer = CharTokenizer(sorted(set(map(chr, range(32, 127))) | {"\n"}))
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(checkpoint_of(model, tokenizer), path)
    return path


def test_bad_input_is_one_error_line_and_the_index_is_kept(corpus, berts, dense_index, tmp_path):
    index = tmp_path / "idx"
    run_script("rag.py", "index", str(corpus), f"--index={index}")
    before = (index / "chunks.jsonl").read_bytes()
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("kept")
    cases = {
        "missing source": ["index", str(tmp_path / "nowhere"), f"--index={index}"],
        "empty source": ["index", str(tmp_path / "empty"), f"--index={index}"],
        "folder that is no index": ["index", str(corpus), f"--index={tmp_path / 'notes'}"],
        "embedder that is not there": ["index", str(corpus), f"--index={index}", f"--embedder=hf:{tmp_path / 'no'}"],
        "question the tokenizer cannot encode": ["ask", "Where is the telescope, in \u20ac?", f"--index={index}",
                                                 f"--init_from={char_model(tmp_path / 'char.pt')}"],
        "another embedder": ["search", "telescope", f"--index={dense_index}", f"--embedder=hf:{berts[1]}"],
        "dense on a bm25 index": ["search", "telescope", f"--index={index}", "--retriever=dense"],
        "no index": ["search", "telescope", f"--index={tmp_path / 'none'}"],
        "no question": ["search", "", f"--index={index}"],
        "unknown command": ["serch", "telescope"],
    }
    for name, args in cases.items():
        result = run_script("rag.py", *args, check=False)
        assert_clean_error(result)
    assert "embedded with" in run_script("rag.py", *cases["another embedder"], check=False).stderr
    assert (index / "chunks.jsonl").read_bytes() == before and (tmp_path / "notes" / "readme.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["char.pt", "empty", "idx", "notes"]  # no temporary folder left behind
    malformed = write_rows(tmp_path / "q.jsonl", [{"question": "q", "answer": "a", "source": "s"},
                                                  {"question": "q", "answer": 3, "source": "s"}])
    result = run_script("rag.py", "eval", str(malformed), f"--index={index}", check=False)
    assert_clean_error(result)
    assert "line 2" in result.stderr
    write_rows(malformed, ["{not json"])
    result = run_script("rag.py", "eval", str(malformed), f"--index={index}", check=False)
    assert_clean_error(result)
    assert "line 1" in result.stderr
