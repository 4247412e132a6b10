"""Retrieval, in plain steps: documents -> chunks -> scores against a question -> the best chunks.

  read_sources   text, markdown and .py files, folders of them, or an hf: data set -> documents
  chunk_document a document -> chunks of about chunk_tokens tokens, cut at paragraph or line
                 boundaries, each remembering its source and line range
  BM25           word statistics: no model, a few dozen lines
  dense_scores   the vector index: a matrix of unit embeddings times the query's embedding
  fuse_ranks     hybrid: reciprocal rank fusion of several rankings
  rank_chunks    one question -> every chunk in order, with the numbers behind the order
  write_index / open_index   the index as plain files: index.json, chunks.jsonl, embeddings.npy

"Tokens" here are words and punctuation marks (the WORD_OR_MARK pattern), a count close to what
a BPE tokenizer makes of English prose; code makes more BPE tokens per word.
"""

import collections
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from data.dataset import read_text_file
from model.errors import UserError
from model.files import atomic_folder

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".py")
WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")
TERM = re.compile(r"[a-z0-9]+")  # BM25's terms: lower-case letters and digits (snake_case splits)


def count_tokens(text):
    return len(WORD_OR_MARK.findall(text))


# ---- documents ------------------------------------------------------------------------------

def read_sources(sources, split="train", text_field="text", data_root="data"):
    """[(source name, text)] for every source: a file, a folder (its text, markdown and .py
    files, recursively, sorted, hidden ones skipped) or hf:<data set> (one document per row,
    named hf:<name>#<row>). A missing or empty source is a UserError."""
    documents = []
    for source in sources:
        found = []
        if source.startswith("hf:"):
            from data.dataset import hf_documents  # only hf: sources need the datasets library

            found = [(f"{source}#{row}", text) for row, text in
                     enumerate(hf_documents(source[3:], split, text_field, data_root)) if text.strip()]
        else:
            path = Path(source).expanduser()
            if path.is_dir():
                files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                         and not any(part.startswith(".") for part in p.relative_to(path).parts)]
            elif path.is_file():
                files = [path]
            else:
                raise UserError(f"source {source} not found (a file, a folder or hf:<data set>)")
            for file in files:
                text = read_text_file(file)
                if text is not None and text.strip():
                    found.append((str(file), text))
        if not found:
            raise UserError(f"source {source} holds no text (empty, or no {'/'.join(TEXT_SUFFIXES)} files)")
        documents += found
    return documents


# ---- chunks ---------------------------------------------------------------------------------

def chunk_document(source, text, chunk_tokens=200, overlap=40):
    """Chunks of at most chunk_tokens tokens as dicts {source, lines: [first, last] (1-based),
    text}. A chunk grows line by line; it ends at the last paragraph break (a blank line) that
    keeps it at least half full, else at a line. After a cut inside a paragraph the next chunk
    starts `overlap` tokens of whole lines before the end, so a passage cut in two is still
    whole in one of them; after a paragraph break it starts at the next paragraph.
    A single line longer than chunk_tokens is cut between words."""
    if chunk_tokens < 1 or not 0 <= overlap < chunk_tokens:
        raise UserError(f"--chunk_tokens must be at least 1 and --overlap in [0, chunk_tokens), "
                        f"got {chunk_tokens} and {overlap}")
    pieces = []  # (line number, text, tokens): lines, long ones in parts
    for number, line in enumerate(text.splitlines(), 1):
        line = line.rstrip()
        tokens = count_tokens(line)
        if tokens <= chunk_tokens:
            pieces.append((number, line, tokens))
            continue
        part, part_tokens = "", 0
        for word in re.findall(r"\s*\S+", line):
            word_tokens = count_tokens(word)
            if part and part_tokens + word_tokens > chunk_tokens:
                pieces.append((number, part, part_tokens))
                part, part_tokens = word.lstrip(), 0
            else:
                part += word
            part_tokens += word_tokens
        pieces.append((number, part, part_tokens))

    chunks, start = [], 0
    while start < len(pieces):
        end, total, paragraph_end = start, 0, None
        while end < len(pieces) and total + pieces[end][2] <= chunk_tokens:
            total += pieces[end][2]
            end += 1
            if end < len(pieces) and not pieces[end][1].strip() and total >= chunk_tokens / 2:
                paragraph_end = end  # a blank line follows: a good place to stop
        end = max(end, start + 1)
        if end < len(pieces) and paragraph_end is not None:
            end = paragraph_end
        lines = [p for p in pieces[start:end] if p[1].strip()]
        if lines:
            chunks.append({"source": source, "lines": [lines[0][0], lines[-1][0]],
                           "text": "\n".join(p[1] for p in trim_blank(pieces[start:end]))})
        if end >= len(pieces):
            break
        if not pieces[end][1].strip():
            start = end  # a clean cut at a paragraph break: nothing to repeat
            continue
        # cut inside a paragraph: step back over whole lines worth at most `overlap` tokens (always moving forward)
        next_start, repeated = end, 0
        while next_start - 1 > start and repeated + pieces[next_start - 1][2] <= overlap:
            next_start -= 1
            repeated += pieces[next_start][2]
        start = next_start
    return chunks


def trim_blank(pieces):
    while pieces and not pieces[0][1].strip():
        pieces = pieces[1:]
    while pieces and not pieces[-1][1].strip():
        pieces = pieces[:-1]
    return pieces


def source_matches(source, gold):
    """A chunk's source is gold when its path ends with the gold path (whole path parts)."""
    return source == gold or source.endswith("/" + gold.lstrip("/"))


# ---- BM25 -----------------------------------------------------------------------------------

def terms(text):
    return TERM.findall(text.lower())


class BM25:
    """Okapi BM25: a chunk scores, for each query term t it contains,

        idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / average length))

    idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)): rare terms count, words in every chunk
    hardly do. tf is the term's count in the chunk; k1 caps how much repeating a term helps
    (the score saturates), b how much a long chunk is discounted. N is the number of chunks
    and df the number containing t."""

    def __init__(self, texts, k1=1.5, b=0.75):
        self.k1, self.b = k1, b
        counts = [collections.Counter(terms(text)) for text in texts]
        self.n_chunks = len(counts)
        self.lengths = np.array([sum(c.values()) for c in counts], dtype=np.float64)
        self.average_length = float(self.lengths.mean()) if self.n_chunks else 0.0
        postings = collections.defaultdict(lambda: ([], []))  # term -> (chunks that hold it, tf in each)
        for chunk, chunk_counts in enumerate(counts):
            for term, tf in chunk_counts.items():
                postings[term][0].append(chunk)
                postings[term][1].append(tf)
        self.postings = {term: (np.array(chunks), np.array(tfs, dtype=np.float64))
                         for term, (chunks, tfs) in postings.items()}

    def idf(self, term):
        df = len(self.postings[term][0]) if term in self.postings else 0
        return math.log(1 + (self.n_chunks - df + 0.5) / (df + 0.5))

    def scores(self, query):
        """(score of every chunk, {query term: its share of every chunk's score}), one array
        operation per distinct query term over the chunks that hold it."""
        scores = np.zeros(self.n_chunks)
        shares = {}
        for term in dict.fromkeys(terms(query)):
            if term not in self.postings:
                continue
            chunks, tf = self.postings[term]
            norm = 1 - self.b + self.b * self.lengths[chunks] / self.average_length
            shares[term] = np.zeros(self.n_chunks)
            shares[term][chunks] = self.idf(term) * tf * (self.k1 + 1) / (tf + self.k1 * norm)
            scores += shares[term]
        return scores, shares


def term_shares(shares, chunk):
    """{term: its share of this chunk's BM25 score} for the query terms the chunk holds."""
    return {term: float(share[chunk]) for term, share in shares.items() if share[chunk] > 0}


# ---- dense vectors, and fusion --------------------------------------------------------------

def dense_scores(embeddings, query_embedding):
    """The vector index: unit rows times a unit query = the cosine of each chunk."""
    return embeddings @ query_embedding


def top(scores, k, only_positive=False):
    """The indices of the k highest scores, best first (argpartition: no full sort)."""
    candidates = np.flatnonzero(scores > 0) if only_positive else np.arange(len(scores))
    k = min(k, len(candidates))
    if k == 0:
        return np.array([], dtype=np.int64)
    best = candidates[np.argpartition(-scores[candidates], k - 1)[:k]]
    return best[np.argsort(-scores[best], kind="stable")]


def fuse_ranks(rankings, k=60):
    """Reciprocal rank fusion: each ranking gives the chunk at rank r (1-based) 1 / (k + r);
    the sums order the chunks. k = 60 is the value of Cormack et al. (2009): it keeps one
    retriever's first place from outweighing agreement further down. -> {chunk: score}."""
    fused = collections.defaultdict(float)
    for ranking in rankings:
        for rank, chunk in enumerate(np.asarray(ranking).tolist(), 1):
            fused[chunk] += 1 / (k + rank)
    return dict(fused)


def rank_chunks(index, query, retriever, query_embedding=None):
    """Every chunk the retriever can rank, best first, with the numbers behind the order:
    {"order": chunk ids, "score": {chunk: score}, "bm25": {chunk: (rank, score)}, "bm25_terms":
    {term: share per chunk} (see term_shares), "dense": {chunk: (rank, cosine)}}. BM25 ranks
    only chunks that share a term with the query."""
    ranking = {"bm25": {}, "bm25_terms": {}, "dense": {}}
    rankings = []
    if retriever in ("bm25", "hybrid"):
        scores, ranking["bm25_terms"] = index["bm25"].scores(query)
        order = top(scores, len(scores), only_positive=True)
        ranking["bm25"] = dict(zip(order.tolist(), zip(range(1, len(order) + 1), scores[order].tolist())))
        rankings.append(order)
    if retriever in ("dense", "hybrid"):
        cosines = dense_scores(index["embeddings"], query_embedding)
        order = top(cosines, len(cosines))
        ranking["dense"] = dict(zip(order.tolist(), zip(range(1, len(order) + 1), cosines[order].tolist())))
        rankings.append(order)
    if retriever == "hybrid":
        fused = fuse_ranks(rankings)
        ranking["order"] = sorted(fused, key=lambda c: -fused[c])
        ranking["score"] = fused
    else:
        ranking["order"] = rankings[0].tolist()
        ranking["score"] = {c: details[1] for c, details in ranking[retriever].items()}
    return ranking


# ---- the index on disk ----------------------------------------------------------------------

INDEX_FILES = ("index.json", "chunks.jsonl", "embeddings.npy")


def write_index(folder, chunks, info, embeddings=None):
    """index.json (what made it), chunks.jsonl (one chunk per line) and, for a dense index,
    embeddings.npy (row i embeds chunk i). The folder is replaced as a whole (atomic_folder):
    a failed run keeps the index that was there. A folder that is not an index is refused
    rather than replaced."""
    if os.path.exists(folder) and not os.path.exists(os.path.join(folder, "index.json")):
        raise UserError(f"{folder} exists and is not an index (no index.json): choose another --index")
    with atomic_folder(folder) as new:
        with open(os.path.join(new, "chunks.jsonl"), "w", encoding="utf-8") as f:
            for i, chunk in enumerate(chunks):
                f.write(json.dumps({"id": i, **chunk}, ensure_ascii=False) + "\n")
        if embeddings is not None:
            np.save(os.path.join(new, "embeddings.npy"), embeddings.astype(np.float32))
        with open(os.path.join(new, "index.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)


def open_index(folder, k1=1.5, b=0.75):
    """{"info", "chunks", "embeddings" (None for a BM25-only index), "bm25"}; BM25's counts
    are made from the chunks' text here, so nothing else on disk has to agree with it."""
    info_path = os.path.join(folder, "index.json")
    if not os.path.exists(info_path):
        raise UserError(f"no index at {folder} (make one: python rag.py index SOURCE --index={folder})")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        chunks = []
        with open(os.path.join(folder, "chunks.jsonl"), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                chunk = json.loads(line)
                if not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str) \
                        or not isinstance(chunk.get("source"), str):
                    raise ValueError(f"chunks.jsonl line {number} lacks text or source")
                chunks.append(chunk)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # json's errors are ValueErrors
        raise UserError(f"index {folder} is damaged: {e}") from None
    embeddings = None
    if info.get("embedder"):
        try:
            embeddings = np.load(os.path.join(folder, "embeddings.npy"))
        except (OSError, ValueError) as e:
            raise UserError(f"index {folder} is damaged: embeddings.npy: {e}") from None
        if embeddings.shape != (len(chunks), info["embedder"]["dim"]):
            raise UserError(f"index {folder} is damaged: embeddings.npy is {embeddings.shape}, "
                            f"expected ({len(chunks)}, {info['embedder']['dim']})")
    if not chunks:
        raise UserError(f"index {folder} holds no chunks")
    return {"info": info, "chunks": chunks, "embeddings": embeddings,
            "bm25": BM25([chunk["text"] for chunk in chunks], k1, b)}
