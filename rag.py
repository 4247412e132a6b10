"""Retrieval-augmented generation, every number shown: chunks, scores, the prompt, and what the
retrieved text changed in the answer's probabilities.

    python rag.py index docs/ README.md --index=idx                      # chunks (BM25 needs nothing else)
    python rag.py index docs/ --index=idx --embedder=hf:sentence-transformers/all-MiniLM-L6-v2
    python rag.py search "how is the KV cache sized?" --index=idx --top=5
    python rag.py ask "how is the KV cache sized?" --index=idx --init_from=hf:HuggingFaceTB/SmolLM2-135M-Instruct
    python rag.py ask "..." --index=idx --init_from=... --no_retrieval    # the model alone
    python rag.py ask "..." --index=idx --init_from=... --stuff           # as many chunks as fit, best first
    python rag.py make_eval SOURCE... --out=questions.jsonl               # questions built from docstrings
    python rag.py eval questions.jsonl --index=idx [--init_from=...] [--json]

Retrievers (--retriever): bm25 (word statistics), dense (cosine of the embedder's vectors),
hybrid (reciprocal rank fusion of the two); auto = hybrid for an index with embeddings, else bm25.
The index is a folder of plain files (data/retrieval.py): index.json, chunks.jsonl, embeddings.npy.
"""

import ast
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from data.retrieval import (chunk_document, count_tokens, open_index, rank_chunks, read_sources, source_matches,
                            term_shares, terms, write_index)
from model.cli import (SamplingOptions, check_sampling_options, field, main_guard, parse_config, pick_dtype,
                       resolve_device)
from model.errors import UserError

COMMANDS = ("index", "search", "ask", "eval", "make_eval")
USAGE = ("usage: python rag.py index SOURCE... | search QUESTION | ask QUESTION | eval FILE.jsonl | "
         "make_eval SOURCE... --out=FILE.jsonl  [--field=value ...]")
RETRIEVERS = ("auto", "bm25", "dense", "hybrid")
INSTRUCTION = "Answer the question using the context below. Answer briefly."


@dataclass
class RagConfig(SamplingOptions):
    # SamplingOptions' model fields, with defaults for answering: no model unless asked, greedy
    init_from: str = field("", "the model that answers (ask, eval): path/to/ckpt.pt | hf:<folder or owner/name> "
                           "| gpt2 ... ('' = none: eval scores retrieval only)")
    prompt: str = field("", "the question (search, ask), as text or FILE:path, instead of the argument")
    temperature: float = field(0.0, "0 = greedy (always the most likely token); higher = more random")
    index: str = field("index", "folder of the index")
    embedder: str = field("", "index: hf:<folder or owner/name> of a sentence-embedding model ('' = BM25 only); "
                          "search: must be the index's (default)")
    chunk_tokens: int = field(200, "index: most tokens (words and punctuation marks) per chunk")
    overlap: int = field(40, "index: tokens of whole lines a chunk repeats from the one before")
    batch_size: int = field(32, "index: chunks embedded per batch")
    split: str = field("train", "index: split of an hf: data set")
    text_field: str = field("text", "index: column of an hf: data set that holds the text")
    data_root: str = field("data", "index: where hf: data sets are cached")
    retriever: str = field("auto", "auto | bm25 | dense | hybrid (auto: hybrid when the index has embeddings)")
    query_prefix: str = field("", "text put before the question for the embedder (bge models want "
                              "'Represent this sentence for searching relevant passages: ')")
    top: int = field(5, "search: chunks shown; ask, eval: chunks put in the prompt")
    preview_lines: int = field(4, "search, ask: lines of each chunk shown (0 = all)")
    max_new_tokens: int = field(64, "ask, eval: most tokens of an answer")
    context_tokens: int = field(0, "ask, eval: longest prompt + answer in tokens (0 = the model's context); "
                                "--stuff fills it")
    no_retrieval: bool = field(False, "ask: the model alone, without retrieved chunks")
    stuff: bool = field(False, "ask: as many chunks as fit in the context, best first, instead of --top")
    answers: str = field("rag,none,stuff", "eval with --init_from: which ways to answer (comma-separated): rag "
                         "(top chunks), none (no retrieval), stuff (chunks best first to --context_tokens)")
    questions: int = field(0, "eval: the first N questions (0 = all); make_eval: how many to write (0 = all)")
    out: str = field("", "make_eval: the questions file to write")
    json: bool = field(False, "search, eval: print JSON instead of text")


def main():
    args = sys.argv[1:]
    flags = [a for a in args if a.startswith("-")]
    cfg = parse_config(RagConfig, flags, USAGE)  # --help before anything else is required
    positional = [a for a in args if not a.startswith("-")]
    if not positional or positional[0] not in COMMANDS:
        raise UserError(f"expected a command: {', '.join(COMMANDS)} (see --help)")
    command, arguments = positional[0], positional[1:]
    check_config(cfg)
    if command == "index":
        return index_command(cfg, arguments)
    if command == "make_eval":
        return make_eval_command(cfg, arguments)
    if command == "eval":
        if len(arguments) != 1:
            raise UserError("eval takes one questions file: python rag.py eval FILE.jsonl --index=...")
        return eval_command(cfg, arguments[0])
    question = question_of(cfg, arguments, command)
    return search_command(cfg, question) if command == "search" else ask_command(cfg, question)


def check_config(cfg):
    check_sampling_options(cfg)
    if cfg.retriever not in RETRIEVERS:
        raise UserError(f"unknown --retriever={cfg.retriever}: use {', '.join(RETRIEVERS)}")
    if cfg.top < 1 or cfg.max_new_tokens < 1 or cfg.batch_size < 1 or cfg.context_tokens < 0 or cfg.questions < 0:
        raise UserError("--top, --max_new_tokens and --batch_size must be at least 1, "
                        "--context_tokens and --questions 0 or more")
    if not set(answer_modes(cfg)) <= {"rag", "none", "stuff"} or not answer_modes(cfg):
        raise UserError(f"--answers={cfg.answers}: use a comma-separated choice of rag, none and stuff")
    if cfg.no_retrieval and cfg.stuff:
        raise UserError("--no_retrieval and --stuff are two other ways to answer: choose one")


def answer_modes(cfg):
    return [m.strip() for m in cfg.answers.split(",") if m.strip()]


def question_of(cfg, arguments, command):
    if len(arguments) > 1:
        raise UserError(f"{command} takes one question (quote it): got {len(arguments)} arguments")
    question = arguments[0] if arguments else cfg.prompt
    if question.startswith("FILE:"):
        path = question[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                question = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the question from {path}: {e}") from None
    if not question.strip():
        raise UserError(f"{command} needs a question: python rag.py {command} \"...\" (or --prompt=FILE:path)")
    return question.strip()


# ---- index ----------------------------------------------------------------------------------

def index_command(cfg, sources):
    if not sources:
        raise UserError("index needs at least one source: a file, a folder or hf:<data set>")
    started = time.perf_counter()
    documents = read_sources(sources, cfg.split, cfg.text_field, cfg.data_root)
    chunks = []
    for source, text in tqdm(documents, desc="chunking", unit="doc", disable=None):
        chunks += chunk_document(source, text, cfg.chunk_tokens, cfg.overlap)
    if not chunks:
        raise UserError(f"the sources hold no text to index: {', '.join(sources)}")
    sizes = [count_tokens(chunk["text"]) for chunk in chunks]
    print(f"read {len(documents):,} documents, {sum(len(t) for _, t in documents):,} characters; "
          f"{len(chunks):,} chunks of at most {cfg.chunk_tokens} tokens (mean {np.mean(sizes):.0f}, "
          f"overlap {cfg.overlap})")
    info = {"format": 1, "chunks": len(chunks), "chunk_tokens": cfg.chunk_tokens, "overlap": cfg.overlap,
            "sources": sources, "embedder": None}
    embeddings = None
    if cfg.embedder:
        from model.encoder import embed, load_encoder

        encoder, tokenizer, description = load_encoder(cfg.embedder)
        print(f"embedder {cfg.embedder}: {description['dim']} dimensions, {description['pooling']} pooling, "
              f"at most {description['max_tokens']} tokens, weights sha256 {description['sha256'][:12]}")
        with tqdm(total=len(chunks), desc="embedding", unit="chunk", disable=None) as progress:
            embeddings, truncated = embed(encoder, tokenizer, [c["text"] for c in chunks], cfg.batch_size, progress)
        if truncated:
            print(f"note: {truncated:,} chunks are longer than the embedder's {description['max_tokens']} tokens: "
                  "their embeddings see only their start (a smaller --chunk_tokens avoids it)")
        info["embedder"] = {key: description[key] for key in ("embedder", "sha256", "dim", "pooling", "max_tokens")}
    info["bm25_average_terms"] = sum(len(terms(c["text"])) for c in chunks) / len(chunks)
    write_index(cfg.index, chunks, info, embeddings)
    files = ", ".join(f"{name} ({os.path.getsize(os.path.join(cfg.index, name)) / 1e6:.1f} MB)"
                      for name in ("chunks.jsonl", "embeddings.npy") if os.path.exists(os.path.join(cfg.index, name)))
    print(f"wrote {cfg.index}/: index.json, {files} in {time.perf_counter() - started:.1f} s")


# ---- retrieval ------------------------------------------------------------------------------

def open_for_queries(cfg):
    """(index, retriever, query embedder or None). The embedder is the index's own: another
    one (another model, or the same name with other weights) is refused."""
    index = open_index(cfg.index)
    embedder = index["info"].get("embedder")
    retriever = cfg.retriever if cfg.retriever != "auto" else ("hybrid" if embedder else "bm25")
    if retriever == "bm25":
        return index, retriever, None
    if not embedder:
        raise UserError(f"index {cfg.index} has no embeddings (--retriever={retriever} needs them): "
                        "re-index with --embedder=hf:<model>, or use --retriever=bm25")
    from model.encoder import load_encoder

    encoder, tokenizer, description = load_encoder(cfg.embedder or embedder["embedder"])
    if description["sha256"] != embedder["sha256"]:
        raise UserError(f"index {cfg.index} was embedded with {embedder['embedder']} (weights sha256 "
                        f"{embedder['sha256'][:12]}), not {cfg.embedder} ({description['sha256'][:12]}): "
                        "query with the same embedder, or re-index")
    return index, retriever, (encoder, tokenizer)


def retrieve(cfg, index, retriever, embedder, question):
    """(ranking from data.retrieval.rank_chunks, seconds to embed the question, seconds to score)."""
    started = time.perf_counter()
    query_embedding = None
    if embedder is not None:
        from model.encoder import embed

        query_embedding = embed(*embedder, [cfg.query_prefix + question])[0][0]
    embedded = time.perf_counter() if embedder is not None else started
    ranking = rank_chunks(index, question, retriever, query_embedding)
    return ranking, embedded - started, time.perf_counter() - embedded


def timing(embed_seconds, score_seconds):
    embedding = f"question embedded in {embed_seconds * 1000:.1f} ms, " if embed_seconds else ""
    return f"{embedding}scored in {score_seconds * 1000:.1f} ms"


def where(chunk):
    first, last = chunk["lines"]
    return f"{chunk['source']}:{first}-{last}" if first != last else f"{chunk['source']}:{first}"


def score_text(ranking, retriever, chunk_id):
    """The numbers behind one chunk's place: BM25's score and the terms that made it, the
    cosine, or the fused score with both ranks."""
    parts = []
    if chunk_id in ranking["bm25"]:
        rank, score = ranking["bm25"][chunk_id]
        shares = term_shares(ranking["bm25_terms"], chunk_id)
        terms = ", ".join(f"{t} {s:.2f}" for t, s in sorted(shares.items(), key=lambda kv: -kv[1]))
        parts.append(f"bm25 {score:.2f}" + (f" (#{rank})" if retriever == "hybrid" else "") + f" [{terms}]")
    elif retriever == "hybrid":
        parts.append("bm25 - (no query term)")
    if chunk_id in ranking["dense"]:
        rank, cosine = ranking["dense"][chunk_id]
        parts.append(f"cosine {cosine:.3f}" + (f" (#{rank})" if retriever == "hybrid" else ""))
    if retriever == "hybrid":
        parts.insert(0, f"rrf {ranking['score'][chunk_id]:.4f} =")
    return " ".join(parts)


def print_chunks(cfg, index, ranking, retriever, chunk_ids, file=sys.stdout):
    for place, chunk_id in enumerate(chunk_ids, 1):
        chunk = index["chunks"][chunk_id]
        print(f"{place}. {where(chunk)}  {score_text(ranking, retriever, chunk_id)}", file=file)
        lines = chunk["text"].splitlines()
        shown = lines if cfg.preview_lines == 0 else lines[:cfg.preview_lines]
        for line in shown:
            print(f"   | {line}", file=file)
        if len(shown) < len(lines):
            print(f"   | ... ({len(lines) - len(shown)} more lines)", file=file)


def search_command(cfg, question):
    index, retriever, embedder = open_for_queries(cfg)
    ranking, embed_seconds, score_seconds = retrieve(cfg, index, retriever, embedder, question)
    seconds = embed_seconds + score_seconds
    best = ranking["order"][:cfg.top]
    if cfg.json:
        rows = [{"rank": place, "id": c, "source": index["chunks"][c]["source"], "lines": index["chunks"][c]["lines"],
                 "score": ranking["score"][c],
                 "bm25_terms": term_shares(ranking["bm25_terms"], c) if c in ranking["bm25"] else None,
                 "cosine": ranking["dense"][c][1] if c in ranking["dense"] else None,
                 "text": index["chunks"][c]["text"]} for place, c in enumerate(best, 1)]
        print(json.dumps({"retriever": retriever, "chunks": len(index["chunks"]), "seconds": seconds,
                          "results": rows}, ensure_ascii=False))
        return
    print(f"{retriever} over {len(index['chunks']):,} chunks of {cfg.index}: {timing(embed_seconds, score_seconds)}")
    if not best:
        print("no chunk shares a term with the question (try --retriever=dense on an index with embeddings)")
    print_chunks(cfg, index, ranking, retriever, best)


# ---- answering ------------------------------------------------------------------------------

def context_message(question, chunks):
    """The user's turn: the instruction, the chunks (each with its source), the question."""
    if not chunks:
        return question
    context = "\n\n".join(f"[{i}] {where(chunk)}\n{chunk['text']}" for i, chunk in enumerate(chunks, 1))
    return f"{INSTRUCTION}\n\nContext:\n{context}\n\nQuestion: {question}"


def chat_ids(tokenizer, question, chunks):
    from model.chat import encode_chat, render_chat

    messages = [{"role": "user", "content": context_message(question, chunks)}]
    return encode_chat(tokenizer, messages), render_chat(tokenizer, messages)


class Answerer:
    """The model, its tokenizer and the budget of a prompt: what ask and eval share."""

    def __init__(self, cfg):
        from model.chat import end_of_turn_ids
        from model.checkpoint import load_model

        device = resolve_device(cfg.device)
        self.model, self.tokenizer, self.source = load_model(cfg.init_from, cfg.out_dir, device=device,
                                                             dtype=pick_dtype(cfg.dtype, device.split(":")[0]), quant=cfg.quant)
        self.model.eval()
        self.cfg, self.device = cfg, device
        block_size = self.model.config.block_size
        if cfg.context_tokens > block_size:
            raise UserError(f"--context_tokens={cfg.context_tokens} is more than the model's context ({block_size})")
        self.context_tokens = cfg.context_tokens or block_size
        if cfg.max_new_tokens >= self.context_tokens:
            raise UserError(f"--max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in "
                            f"{self.context_tokens} tokens of context")
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        self.chunk_lengths = {}

    def prompt(self, question, index, ranking, mode):
        """(ids, text, chunks used) for mode rag (the top chunks), none (no chunks) or stuff
        (chunks best first until the next one would not fit with the answer in context_tokens).
        Where the top chunks do not fit either, the last ones are dropped."""
        budget = self.context_tokens - self.cfg.max_new_tokens
        order = [] if mode == "none" else ranking["order"] if mode == "rag" else \
            stuffing_order(ranking["order"], len(index["chunks"]))
        chosen = []
        if order:
            limit = self.cfg.top if mode == "rag" else len(order)
            base = len(chat_ids(self.tokenizer, question, [index["chunks"][order[0]]])[0]) - \
                self.chunk_length(index, order[0])  # the template, the instruction and the question
            used = base
            for chunk_id in order[:limit]:
                length = self.chunk_length(index, chunk_id)
                if used + length > budget:
                    break
                chosen.append(chunk_id)
                used += length
        while True:  # the estimate above adds chunk by chunk; the real prompt decides
            ids, text = chat_ids(self.tokenizer, question, [index["chunks"][c] for c in chosen])
            if len(ids) <= budget or not chosen:
                break
            chosen.pop()
        if len(ids) > budget:
            raise UserError(f"the question alone is {len(ids)} tokens; with --max_new_tokens={self.cfg.max_new_tokens} "
                            f"it does not fit in {self.context_tokens} tokens of context")
        return ids, text, chosen

    def chunk_length(self, index, chunk_id):
        """Tokens a chunk adds to a prompt (its text, its source line and the blank lines)."""
        if chunk_id not in self.chunk_lengths:
            chunk = index["chunks"][chunk_id]
            self.chunk_lengths[chunk_id] = len(self.tokenizer.encode(f"[00] {where(chunk)}\n{chunk['text']}\n\n"))
        return self.chunk_lengths[chunk_id]

    def answer(self, prompt_ids, on_token=None):
        """The answer's ids (greedy unless --temperature), up to the end-of-turn marker."""
        import torch

        cfg = self.cfg
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        answer_ids = []
        for token_id in self.model.generate(prompt_ids, cfg.max_new_tokens, temperature=cfg.temperature,
                                            top_k=cfg.top_k or None, top_p=cfg.top_p, generator=generator):
            if token_id in self.stop_ids:
                break
            answer_ids.append(token_id)
            if on_token is not None:
                on_token(token_id)
        return answer_ids

    def probabilities(self, prompt_ids, answer_ids):
        """Each answer token's probability after the prompt and the answer's earlier tokens."""
        import torch

        if not answer_ids:
            return []
        ids = torch.tensor([prompt_ids + answer_ids], device=self.model.wte.weight.device)
        with torch.inference_mode():
            logits, _ = self.model(ids)
        log_probs = logits[0, len(prompt_ids) - 1:-1].float().log_softmax(-1)
        return log_probs.gather(-1, torch.tensor(answer_ids, device=ids.device)[:, None])[:, 0].exp().tolist()


def stuffing_order(order, n_chunks):
    """The ranked chunks, then every chunk the retriever did not rank, in index order."""
    ranked = set(order)
    return list(order) + [c for c in range(n_chunks) if c not in ranked]


def ask_command(cfg, question):
    if not cfg.init_from:
        raise UserError("ask needs a model to answer: --init_from=path/to/ckpt.pt | hf:<folder or owner/name>")
    mode = "none" if cfg.no_retrieval else "stuff" if cfg.stuff else "rag"
    index, ranking = None, None
    if mode != "none":
        index, retriever, embedder = open_for_queries(cfg)
    answerer = Answerer(cfg)
    tokenizer = answerer.tokenizer
    if mode != "none":
        ranking, embed_seconds, score_seconds = retrieve(cfg, index, retriever, embedder, question)
    prompt_ids, prompt_text, chosen = answerer.prompt(question, index, ranking, mode)
    if mode != "none":
        print(f"== retrieved: {retriever} over {len(index['chunks']):,} chunks ({timing(embed_seconds, score_seconds)}); "
              f"{len(chosen)} in the prompt" + (f" (stuffed to {answerer.context_tokens} tokens)" if mode == "stuff" else ""))
        shown = chosen if mode == "rag" else chosen[:cfg.top]
        print_chunks(cfg, index, ranking, retriever, shown)
        if len(chosen) > len(shown):
            print(f"   ... and {len(chosen) - len(shown)} more chunks")
    print(f"== prompt: {len(prompt_ids):,} tokens, the chat template applied, exactly as the model reads it:")
    print(prompt_text)
    print("== answer:")
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    started = time.perf_counter()
    answer_ids = answerer.answer(prompt_ids, lambda t: print(decoder.decode(tokenizer.token_bytes(t)), end="",
                                                             flush=True))
    print(decoder.decode(b"", final=True))
    seconds = time.perf_counter() - started
    print(f"== {mode}: prompt {len(prompt_ids):,} tokens, answer {len(answer_ids)} tokens in {seconds:.2f} s "
          f"({answerer.source['init_from']})")
    if mode == "none" or not answer_ids:
        return
    bare_ids = chat_ids(tokenizer, question, [])[0]
    with_context = answerer.probabilities(prompt_ids, answer_ids)
    without = answerer.probabilities(bare_ids, answer_ids)
    print(f"== each answer token's probability with the {len(chosen)} chunk{'s' * (len(chosen) != 1)} and without "
          f"them (the model alone, prompt {len(bare_ids)} tokens):")
    print(f"{'token':<20} {'with':>8} {'without':>8} {'ratio':>10}")
    for token_id, p_with, p_without in zip(answer_ids, with_context, without):
        text = repr(tokenizer.decode([token_id]))[:20]
        print(f"{text:<20} {p_with:>8.4f} {p_without:>8.4f} {p_with / max(p_without, 1e-12):>9.1f}x")
    log_with, log_without = float(np.log(with_context).sum()), float(np.log(without).sum())
    print(f"the whole answer: log-probability {log_with:.2f} with the context, {log_without:.2f} without: "
          f"the context made it e^{log_with - log_without:.2f} = {np.exp(min(log_with - log_without, 700)):.3g} "
          "times as likely")


# ---- eval -----------------------------------------------------------------------------------

def read_questions(path, limit=0):
    """Rows {"question", "answer", "source"} of a JSONL file; a bad row is named by its line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise UserError(f"questions file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read questions file {path}: {e}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number} is not JSON: {e.msg}") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                for k in ("question", "answer", "source")):
            raise UserError(f"{path} line {number}: expected {{\"question\", \"answer\", \"source\"}} with text "
                            f"in each, got {line.strip()[:80]}")
        rows.append(row)
    if not rows:
        raise UserError(f"questions file {path} holds no questions")
    return rows[:limit] if limit else rows


def gold_rank(index, ranking, gold):
    """The place (1-based) of the first chunk from the gold source, None if none is ranked."""
    for place, chunk_id in enumerate(ranking["order"], 1):
        if source_matches(index["chunks"][chunk_id]["source"], gold):
            return place
    return None


def eval_command(cfg, path):
    rows = read_questions(path, cfg.questions)
    index, retriever, embedder = open_for_queries(cfg)
    answerer = Answerer(cfg) if cfg.init_from else None
    modes = answer_modes(cfg) if answerer else ()
    ranks, correct = [], {m: 0 for m in modes}
    seconds, prompt_lengths = {m: 0.0 for m in modes}, {m: 0 for m in modes}
    for number, row in enumerate(rows, 1):
        ranking, embed_seconds, score_seconds = retrieve(cfg, index, retriever, embedder, row["question"])
        retrieval_seconds = embed_seconds + score_seconds
        ranks.append(gold_rank(index, ranking, row["source"]))
        line = f"{number}/{len(rows)} gold {row['source']} at rank {ranks[-1] or '-'}"
        for mode in modes:
            started = time.perf_counter()
            prompt_ids, _, _ = answerer.prompt(row["question"], index, ranking, mode)
            answer = answerer.tokenizer.decode(answerer.answer(prompt_ids))
            seconds[mode] += time.perf_counter() - started + (retrieval_seconds if mode != "none" else 0)
            prompt_lengths[mode] += len(prompt_ids)
            right = row["answer"].lower() in answer.lower()
            correct[mode] += right
            line += f" | {mode} {'right' if right else 'wrong'} {' '.join(answer.split())[:60]!r}"
        if modes:  # a line per question on stderr: a long run shows its progress and each answer
            print(line + f" (gold {row['answer']!r})", file=sys.stderr, flush=True)
    n = len(rows)
    results = {f"recall@{k}": sum(1 for r in ranks if r is not None and r <= k) / n for k in (1, 3, 5)}
    results["mrr"] = sum(1 / r for r in ranks if r is not None) / n
    for mode in modes:
        results[f"accuracy_{mode}"] = correct[mode] / n
    for mode in modes:
        results[f"seconds_per_question_{mode}"] = seconds[mode] / n
    if cfg.json:
        print(json.dumps(results))
        return
    print(f"{n} questions from {path}; {retriever} over {len(index['chunks']):,} chunks of {cfg.index}")
    print("  ".join(f"{key} {value:.3f}" for key, value in results.items() if not key.startswith(("acc", "sec"))))
    if answerer:
        print(f"answers by {answerer.source['init_from']} ({'greedy' if cfg.temperature == 0 else 'sampled'}, "
              f"at most {cfg.max_new_tokens} tokens, context {answerer.context_tokens}): share that contain the "
              "gold answer")
        for mode, what in (("rag", f"top {cfg.top} chunks"), ("none", "no retrieval"),
                           ("stuff", "stuffed, best first")):
            if mode not in modes:
                continue
            print(f"  {mode:<6} {results[f'accuracy_{mode}']:.3f}   prompt {prompt_lengths[mode] / n:7.0f} tokens "
                  f"(mean)   {results[f'seconds_per_question_{mode}']:.2f} s/question   ({what})")


# ---- make_eval ------------------------------------------------------------------------------

def first_sentence(docstring):
    """The docstring's first sentence: up to the first blank line, then to the first '. '."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    return match.group(1) if match else None


def docstring_questions(documents):
    """Every function or method of the .py documents whose docstring's first sentence makes a
    fair question: a public name of 5+ characters defined in only one file (so the gold source
    is certain), a sentence of 5 to 40 words that does not say the name and is no other
    function's too. -> rows {"question", "answer" (the name), "source" (the file)}."""
    found, files_of, sentences = [], {}, {}
    for source, text in documents:
        if not source.endswith(".py"):
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                files_of.setdefault(node.name, set()).add(source)
                docstring = ast.get_docstring(node)
                sentence = first_sentence(docstring) if docstring else None
                if sentence:
                    found.append((node.name, sentence, source))
                    sentences[sentence] = sentences.get(sentence, 0) + 1
    rows = []
    for name, sentence, source in found:
        if (name.startswith("_") or len(name) < 5 or len(files_of[name]) > 1 or sentences[sentence] > 1
                or not 5 <= len(sentence.split()) <= 40 or name.lower() in sentence.lower()):
            continue
        question = (f'Which Python function is described by this sentence from its documentation: "{sentence}" '
                    "Answer with the function's name.")
        rows.append({"question": question, "answer": name, "source": source})
    return rows


def make_eval_command(cfg, sources):
    if not cfg.out:
        raise UserError("make_eval needs --out=FILE.jsonl")
    if not sources:
        raise UserError("make_eval needs the sources the index is built from (folders or .py files)")
    documents = read_sources(sources)
    rows = docstring_questions(documents)
    if not rows:
        raise UserError(f"no function docstring in {', '.join(sources)} makes a question")
    # gold sources relative to where each source was given (json/decoder.py, not /usr/lib/...)
    roots = [os.path.dirname(os.path.abspath(s).rstrip(os.sep)) for s in sources]
    for row in rows:
        absolute = os.path.abspath(row["source"])
        root = max((r for r in roots if absolute.startswith(r + os.sep)), key=len, default=os.path.dirname(absolute))
        row["source"] = os.path.relpath(absolute, root).replace(os.sep, "/")
    total = len(rows)
    if cfg.questions and cfg.questions < total:
        picked = sorted(random.Random(cfg.seed).sample(range(total), cfg.questions))
        rows = [rows[i] for i in picked]
    from model.files import atomic_write

    with atomic_write(cfg.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} questions to {cfg.out} (of {total} fair docstrings in {len(documents)} files, "
          f"seed {cfg.seed})")


if __name__ == "__main__":
    main_guard(main)
