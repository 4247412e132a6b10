"""EXPLAIN for a language model: the numbers behind every token.

    python explain.py --prompt="def main("                     # tokens, next-token probabilities, loss
    python explain.py --prompt="def main(" --generate=20       # ...and why each generated token was picked
    python explain.py --prompt="import os" --attention=attention.png --layer=0   # attention heatmaps
    python explain.py --neighbors=" return"                    # the closest input embeddings
    python explain.py --prompt="for i in" --logit_lens         # what each layer would already predict
    python explain.py --prompt="for i in" --json               # all of it as one JSON document
    python explain.py --out_dir=out-lora --prompt="..." --compare_base   # a LoRA run against its base

A model's answer to "what comes next?" is a probability for every token of its vocabulary.
This script prints those probabilities, the loss they give the text that really follows,
the attention weights that mixed the positions together, the cosine similarities between
token embeddings, and what the residual stream says after each layer. Nothing is
summarised away: with --json every number shown in the tables is in the document.
"""

import json
import math
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.checkpoint import load_checkpoint, load_model, lora_base_from_checkpoint
from model.cli import (SamplingOptions, check_sampling_options, field, main_guard, parse_config, pick_dtype,
                       read_prompt, resolve_device)
from model.errors import UserError
from model.files import atomic_write
from model.gpt import filter_logits, sample_next_token

USAGE = "usage: python explain.py [--out_dir=out] [--prompt=TEXT|FILE:path] [--field=value ...]"
DPI = 100
MAX_JSON_ATTENTION = 4_000_000  # weights in a --json document (about 80 MB of text)


@dataclass
class ExplainConfig(SamplingOptions):  # temperature, top_k, top_p and seed are for --generate
    top: int = field(5, "candidates shown per position (and neighbors shown per token)")
    generate: int = field(0, "also generate this many tokens, showing how each one was picked")
    attention: str = field("", "draw the prompt's attention weights into this .png file (needs matplotlib)")
    layer: int = field(-1, "with --attention: draw only this layer (0-based; -1 = every layer)")
    head: int = field(-1, "with --attention: draw only this head (0-based; -1 = every head)")
    neighbors: str = field("", "show the tokens whose input embeddings are closest to this text's tokens")
    logit_lens: bool = field(False, "show what the model would predict if it stopped after each layer")
    lens_positions: str = field("last", "with --logit_lens: the positions printed, one row per layer each: last | all "
                                "| a list such as 0,3,-1 (--json holds every position)")
    compare_base: bool = field(False, "a LoRA run: the base's and the adapted model's predictions side by side")
    json: bool = field(False, "print everything as one JSON document on stdout instead of tables")


# ---- tokens as text ------------------------------------------------------------------------

def token_info(tokenizer, token_id):
    """{"id", "text"}. A BPE token can be part of a UTF-8 character; its bytes then show as \\xNN."""
    token_id = int(token_id)
    return {"id": token_id, "text": tokenizer.token_bytes(token_id).decode("utf-8", errors="backslashreplace")}


def show(text, width=None):
    """A token's text with its whitespace made visible ('·' for a space, \\n for a newline), in
    quotes so a token that is only whitespace still shows, cut to `width` characters."""
    visible = []
    for ch in text:
        if ch == " ":
            visible.append("·")
        elif ch in "\n\t\r":
            visible.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif not ch.isprintable():
            visible.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            visible.append(ch)
    shown = "".join(visible)
    if width is not None and len(shown) > width - 2:
        shown = shown[:width - 3] + "…"
    return f"'{shown}'"


# ---- one forward pass, keeping the insides --------------------------------------------------

@torch.no_grad()
def forward_with_internals(model, ids, attention=False, residuals=False):
    """Run the model over one sequence and keep what explain shows.

    Returns (logits (T, vocab), attention weights (n_layer, n_head, T, T) or None, residual
    stream (n_layer + 1, T, n_embd) or None). The residual stream is the vector each position
    carries from layer to layer: the embedding entering the first block, then the output of
    every block (each block adds its attention and MLP results to it)."""
    stream = []
    hooks = []
    if residuals:
        # the model computes everything itself; the hooks only copy what passes through
        hooks.append(model.blocks[0].register_forward_pre_hook(lambda block, args: stream.append(args[0][0])))
        for block in model.blocks:
            hooks.append(block.register_forward_hook(lambda block, args, output: stream.append(output[0])))
    for block in model.blocks:
        block.attn.record_attention = attention  # the attention is then computed by hand and kept
        block.attn.last_attention = None
    try:
        device = model.wte.weight.device
        logits, _ = model(torch.tensor([ids], dtype=torch.long, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        for block in model.blocks:
            block.attn.record_attention = False
    weights = torch.stack([block.attn.last_attention[0] for block in model.blocks]).float() if attention else None
    return logits[0].float(), weights, torch.stack(stream).float() if residuals else None


# ---- the prompt: probabilities, ranks, losses -----------------------------------------------

def explain_prompt(logits, ids, tokenizer, top):
    """For every position: the top candidates for the next token, and how the token that really
    follows fared (its probability, rank and loss = -ln probability)."""
    log_probs = logits.log_softmax(-1)
    probs = log_probs.exp()
    top = min(top, probs.size(-1))
    positions, losses = [], []
    for i, token_id in enumerate(ids):
        values, indices = probs[i].topk(top)
        entry = {"position": i, "token": token_info(tokenizer, token_id),
                 "top": [{**token_info(tokenizer, j), "prob": float(p)} for p, j in zip(values, indices)],
                 "next": None}
        if i + 1 < len(ids):
            target = ids[i + 1]
            loss = -float(log_probs[i, target])
            entry["next"] = {**token_info(tokenizer, target), "prob": float(probs[i, target]),
                             "rank": 1 + int((probs[i] > probs[i, target]).sum()), "loss": loss}
            losses.append(loss)
        positions.append(entry)
    # bits per byte: the loss in bits spread over the text's bytes, comparable across tokenizers
    n_bytes = sum(len(tokenizer.token_bytes(t)) for t in ids[1:])
    summary = {"predictions": len(losses), "bytes": n_bytes, "mean_loss": None, "perplexity": None,
               "bits_per_byte": None}
    if losses:
        mean = sum(losses) / len(losses)
        summary.update(mean_loss=mean, perplexity=math.exp(mean),
                       bits_per_byte=sum(losses) / math.log(2) / n_bytes if n_bytes else None)
    return positions, summary


def compare_with_base(base_logits, logits, ids, tokenizer, top):
    """For every position, the base's and the adapted model's top candidates and the probability
    each gives the token that really follows: where fine-tuning moved the numbers."""
    models = {"base": base_logits.softmax(-1), "adapted": logits.softmax(-1)}
    top = min(top, logits.size(-1))
    positions = []
    for i, token_id in enumerate(ids):
        target = ids[i + 1] if i + 1 < len(ids) else None
        entry = {"position": i, "token": token_info(tokenizer, token_id),
                 "next": token_info(tokenizer, target) if target is not None else None}
        for name, probs in models.items():
            values, indices = probs[i].topk(top)
            entry[name] = {"top": [{**token_info(tokenizer, j), "prob": float(p)} for p, j in zip(values, indices)],
                           "next_prob": float(probs[i, target]) if target is not None else None}
        positions.append(entry)
    losses = {name: [-math.log(max(p[name]["next_prob"], 1e-45)) for p in positions if p["next"]] for name in models}
    summary = {f"{name}_mean_loss": sum(values) / len(values) if values else None for name, values in losses.items()}
    return {"positions": positions, "summary": summary}


# ---- generation: which token was picked, and what the filters cut ---------------------------

def describe_choice(logits, picked, cfg, tokenizer):
    """Why `picked` was chosen from these logits under --temperature/--top_k/--top_p.

    The filters are the ones generation uses (model/gpt.py filter_logits): temperature
    reshapes the distribution, top-k keeps the k most likely tokens, top-p then keeps the
    fewest tokens that reach probability p. "mass" is the share of the tempered distribution a filter kept; the picked
    token's sampling probability is its share of what survived (renormalised)."""
    probs = logits.softmax(-1)
    vocab = probs.size(-1)
    if cfg.temperature == 0:
        sampling = torch.zeros_like(probs)
        sampling[picked] = 1.0
        filters = {"rule": "greedy (temperature 0): the most likely token", "temperature": 0.0,
                   "top_k": {"k": None, "kept": 1, "mass": float(probs[picked])},
                   "top_p": {"p": None, "kept": 1, "mass": float(probs[picked])}}
    else:
        tempered = (logits / cfg.temperature).softmax(-1)
        after_k = filter_logits(logits, cfg.temperature, cfg.top_k or None, None)
        after_p = filter_logits(logits, cfg.temperature, cfg.top_k or None, cfg.top_p)
        sampling = after_p.softmax(-1)

        def kept(filtered):
            survivors = torch.isfinite(filtered)
            return {"kept": int(survivors.sum()), "mass": float(tempered[survivors].sum())}

        filters = {"rule": "sampled", "temperature": cfg.temperature,
                   "top_k": {"k": cfg.top_k or None, **kept(after_k)},
                   "top_p": {"p": cfg.top_p if cfg.top_p < 1 else None, **kept(after_p)}}
    values, indices = probs.topk(min(cfg.top, vocab))
    return {"picked": {**token_info(tokenizer, picked), "prob": float(probs[picked]),
                       "rank": 1 + int((probs > probs[picked]).sum()), "sampling_prob": float(sampling[picked])},
            "filters": filters,
            "top": [{**token_info(tokenizer, j), "prob": float(p), "sampling_prob": float(sampling[j])}
                    for p, j in zip(values, indices)]}


@torch.no_grad()
def explain_generation(model, tokenizer, ids, cfg):
    """Generate cfg.generate tokens with the model's sampling function (model/gpt.py
    sample_next_token, as generation uses), describing each choice.
    The whole context is recomputed for every token (no KV cache): slower, and simpler to trust."""
    device = model.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    block_size = model.config.block_size
    tokens, steps = list(ids), []
    for _ in range(cfg.generate):
        context = tokens[-block_size:]
        logits, _ = model(torch.tensor([context], dtype=torch.long, device=device))
        logits = logits[0, -1].float()
        picked = sample_next_token(logits, cfg.temperature, cfg.top_k or None, cfg.top_p, generator)
        steps.append({"position": len(tokens), **describe_choice(logits, picked, cfg, tokenizer)})
        tokens.append(picked)
        if picked == tokenizer.eos_id:
            break
    new = tokens[len(ids):]
    return {"temperature": cfg.temperature, "top_k": cfg.top_k or None, "top_p": cfg.top_p, "seed": cfg.seed,
            "steps": steps, "text": tokenizer.decode(new)}


# ---- embeddings and the logit lens ----------------------------------------------------------

@torch.no_grad()
def nearest_embeddings(model, tokenizer, ids, top):
    """For each distinct token: the tokens whose input embedding (a row of wte) points the most
    the same way, by cosine similarity. Padding rows past the vocabulary are never looked at."""
    table = model.wte.weight[:model.config.vocab_size].float()
    unit = F.normalize(table, dim=-1)
    result = []
    for token_id in dict.fromkeys(ids):  # distinct, in order
        scores = unit @ unit[token_id]
        scores[token_id] = -math.inf  # a token is always its own nearest neighbour
        values, indices = scores.topk(min(top, table.size(0) - 1))
        neighbors = [{**token_info(tokenizer, j), "cosine": float(s)} for s, j in zip(values, indices)]
        result.append({"token": token_info(tokenizer, token_id), "neighbors": neighbors})
    return result


@torch.no_grad()
def logit_lens(model, tokenizer, ids, residuals, top=3):
    """Decode the residual stream after every layer as if it were the last: final norm, then the
    output head. The last row is exactly the model's prediction; earlier rows show when the
    answer appears."""
    values, indices = [], []
    for residual in residuals:  # one layer at a time: all of them at once can be gigabytes of logits
        probs = model.lm_head(model.ln_f(residual))[..., :model.config.vocab_size].float().softmax(-1)
        best = probs.topk(min(top, probs.size(-1)), dim=-1)
        values.append(best.values)
        indices.append(best.indices)
    values, indices = torch.stack(values), torch.stack(indices)  # (layers, T, top)
    names = ["embedding"] + [f"block {i}" for i in range(len(model.blocks))]
    positions = []
    for t, token_id in enumerate(ids):
        positions.append({
            "position": t, "token": token_info(tokenizer, token_id),
            "next": token_info(tokenizer, ids[t + 1]) if t + 1 < len(ids) else None,
            "layers": [[{**token_info(tokenizer, j), "prob": float(p)} for p, j in zip(values[layer, t],
                                                                                       indices[layer, t])]
                       for layer in range(len(names))]})
    return {"layers": names, "positions": positions}


# ---- the attention picture ------------------------------------------------------------------

TOP_MARGIN, RIGHT_MARGIN, PANEL_GAP = 40, 20, 30  # pixels around and between the heatmaps


def attention_layout(rows, cols, labels):
    """Sizes for a grid of rows x cols heatmaps labelled with these token texts: square panels
    that grow with the number of tokens (a whole grid stays under ~4000 pixels across, so
    12 layers x 12 heads are still drawable), a label font that fits the rows (or every
    few tokens labelled when it cannot), and room on the left and bottom for the labels."""
    n = len(labels)
    panel = min(max(25 * n + 100, 300), 1000)
    panel = max(min(panel, 4000 // max(rows, cols)), 150)
    spacing = panel / DPI * 72 / n  # points between two neighbouring labels
    font = min(9.0, 0.85 * spacing)
    every = 1 if font >= 4 else math.ceil(4 / font)
    font = max(font, 4.0)
    longest = max(len(label) for label in labels[::every])
    margin = int(longest * font * 0.65 / 72 * DPI) + 45  # tick labels, then the axis title
    return {"width": margin + cols * panel + (cols - 1) * PANEL_GAP + RIGHT_MARGIN,
            "height": TOP_MARGIN + rows * panel + (rows - 1) * PANEL_GAP + margin,
            "panel": panel, "margin": margin, "font": font, "every": every}


def attention_labels(tokens):
    return [show(token["text"], 14) for token in tokens]


def draw_attention(path, weights, labels, layers, heads):
    """One heatmap per (layer, head): row = the token looking (query), column = the token
    looked at (key), colour = the weight (each row sums to 1). weights[r][c] is head
    heads[c] of layer layers[r]. Token labels go on the left column and the bottom row only:
    drawing thousands of labels is what makes big grids slow."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    rows, cols, n = len(layers), len(heads), len(labels)
    size = attention_layout(rows, cols, labels)
    width, height, panel, margin = size["width"], size["height"], size["panel"], size["margin"]
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.subplots_adjust(left=margin / width, right=1 - RIGHT_MARGIN / width, bottom=margin / height,
                        top=1 - TOP_MARGIN / height, wspace=PANEL_GAP / panel, hspace=PANEL_GAP / panel)
    axes = fig.subplots(rows, cols, squeeze=False)
    font, ticks = size["font"], list(range(0, n, size["every"]))
    # '$' starts matplotlib's math mode: escape it so code tokens show as typed
    tick_labels = [labels[i].replace("$", r"\$") for i in ticks]
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            ax.imshow(weights[r][c], cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer}, head {head}", fontsize=8)
            if r == rows - 1:
                ax.set_xticks(ticks, tick_labels, rotation=90, fontsize=font)
            else:
                ax.set_xticks([])
            if c == 0:
                ax.set_yticks(ticks, tick_labels, fontsize=font)
            else:
                ax.set_yticks([])
            if rows == cols == 1 and n <= 16:  # one small head: write the numbers in
                for q in range(n):
                    for k in range(q + 1):
                        value = float(weights[r][c][q][k])
                        ax.text(k, q, f"{value:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if value > 0.6 else "black")
    # axis titles centred on the grid, at the outer edge of the label margins
    grid_middle_x = (margin + (width - RIGHT_MARGIN)) / 2 / width
    grid_middle_y = (margin + (height - TOP_MARGIN)) / 2 / height
    fig.text(grid_middle_x, 6 / height, "key: the token looked at", ha="center", va="bottom", fontsize=9)
    fig.text(6 / width, grid_middle_y, "query: the token looking", ha="left", va="center", rotation=90, fontsize=9)
    with warnings.catch_warnings(), atomic_write(path) as f:
        warnings.simplefilter("ignore")  # glyphs missing from the font (emoji, CJK) are drawn as boxes
        fig.savefig(f, dpi=DPI, format="png")


# ---- tables ---------------------------------------------------------------------------------

def prob_text(p):
    if p == 0:
        return "0"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def print_tokens(doc):
    tokens = doc["tokens"]
    print(f"tokens ({len(tokens)}), each as 'text'(id), '·' = space:")
    line = " "
    for token in tokens:
        item = f" {show(token['text'])}({token['id']})"
        if len(line) + len(item) > 100:
            print(line)
            line = " "
        line += item
    print(line)


def print_prompt_table(doc, top):
    positions = doc["positions"]
    width = min(12, max(len(show(t["text"])) for p in positions for t in [p["token"], *p["top"]]))
    candidates_header = f"top {top} candidates for the next token"
    candidates_width = max(len(candidates_header), top * (width + 8))
    print(f"\n{'pos':>4}  {'token':<{max(width, 5)}}  {candidates_header:<{candidates_width}}  "
          f"{'actual next':<{max(width, 11)}} {'prob':>7} {'rank':>5} {'loss':>6}")
    for entry in positions:
        candidates = " ".join(f"{show(c['text'], width):<{width}} {prob_text(c['prob']):<6}" for c in entry["top"])
        token = show(entry["token"]["text"], width)
        row = f"{entry['position']:>4}  {token:<{max(width, 5)}}  {candidates:<{candidates_width}}  "
        nxt = entry["next"]
        if nxt:
            row += (f"{show(nxt['text'], width):<{max(width, 11)}} {prob_text(nxt['prob']):>7} {nxt['rank']:>5} "
                    f"{nxt['loss']:>6.3f}")
        else:
            row += "(after the prompt)"
        print(row.rstrip())
    s = doc["summary"]
    if s["predictions"]:
        bpb = f", {s['bits_per_byte']:.3f} bits per byte ({s['bytes']} bytes)" if s["bits_per_byte"] is not None else ""
        print(f"\nprompt: {s['predictions']} next-token predictions, mean loss {s['mean_loss']:.4f} nats/token, "
              f"perplexity {s['perplexity']:.3f}{bpb}")
    else:
        print("\nprompt: one token, so there is no next token in it to score")


def print_comparison(comparison, base):
    positions = comparison["positions"]
    width = min(10, max(len(show(c["text"])) for p in positions for m in ("base", "adapted") for c in p[m]["top"]))
    top = len(positions[0]["base"]["top"])
    cell = max(top * (width + 7), 20)
    print(f"\nthe base ({base}) against the adapted model: top {top} candidates each, and the probability of "
          "the actual next token")
    token_width = max(width, 5)
    print(f"{'pos':>4}  {'token':<{token_width}}  {'base':<{cell}}  {'adapted':<{cell}}  {'actual next':<{max(width, 11)}} "
          f"{'base':>7} {'adapted':>7}")
    for p in positions:
        cells = [" ".join(f"{show(c['text'], width):<{width}} {prob_text(c['prob']):<5}" for c in p[m]["top"])
                 for m in ("base", "adapted")]
        row = f"{p['position']:>4}  {show(p['token']['text'], width):<{token_width}}  {cells[0]:<{cell}}  {cells[1]:<{cell}}  "
        if p["next"]:
            row += (f"{show(p['next']['text'], width):<{max(width, 11)}} {prob_text(p['base']['next_prob']):>7} "
                    f"{prob_text(p['adapted']['next_prob']):>7}")
        print(row.rstrip())
    s = comparison["summary"]
    if s["base_mean_loss"] is not None:
        print(f"mean loss on the prompt: base {s['base_mean_loss']:.4f}, adapted {s['adapted_mean_loss']:.4f} nats/token")


def print_generation(generation, top):
    g = generation
    print(f"\ngenerated {len(g['steps'])} tokens (temperature {g['temperature']}, top_k {g['top_k'] or 'off'}, "
          f"top_p {g['top_p'] if g['top_p'] < 1 else 'off'}, seed {g['seed']}).\n"
          "prob = the model's probability; sampled = the probability it was drawn with, after temperature, "
          "top-k and top-p;\nkept = tokens left after each filter (their share of the tempered probability):")
    steps = g["steps"]
    if not steps:
        return
    width = max(6, min(16, max(len(show(t["text"])) for s in steps for t in [s["picked"], *s["top"]])))
    print(f"{'pos':>4}  {'picked':<{width}} {'prob':>7} {'rank':>5} {'sampled':>8}  {'top-k kept':<15}"
          f"{'top-p kept':<15}top {top} candidates: prob > sampled")
    for step in steps:
        picked, filters = step["picked"], step["filters"]
        cut = [f"{f['kept']} ({100 * f['mass']:.1f}%)" for f in (filters["top_k"], filters["top_p"])]
        if filters["temperature"] == 0:
            cut = ["greedy", "greedy"]
        candidates = "  ".join(f"{show(c['text'], width)} {prob_text(c['prob'])} > {prob_text(c['sampling_prob'])}"
                               for c in step["top"])
        print(f"{step['position']:>4}  {show(picked['text'], width):<{width}} {prob_text(picked['prob']):>7} "
              f"{picked['rank']:>5} {prob_text(picked['sampling_prob']):>8}  {cut[0]:<15}{cut[1]:<15}{candidates}")
    print(f"continuation: {g['text']!r}")


def print_attention(attention, tokens):
    last = tokens[-1]
    print(f"\nattention drawn to {attention['png']}. Where the last token {show(last['text'])} looks "
          f"(top 3 positions, weight):")
    for layer_index, layer in enumerate(attention["layers"]):
        for head_index, head in enumerate(attention["heads"]):
            row = attention["weights"][layer_index, head_index, -1]
            values, indices = row.topk(min(3, row.numel()))
            looks = "  ".join(f"{show(tokens[k]['text'])}@{int(k)} {float(v):.3f}" for v, k in zip(values, indices))
            print(f"  layer {layer} head {head}: {looks}")


def print_neighbors(neighbors):
    print("\nnearest input embeddings (cosine similarity between rows of wte):")
    for item in neighbors:
        close = "  ".join(f"{show(n['text'])} {n['cosine']:.3f}" for n in item["neighbors"])
        print(f"  {show(item['token']['text'])}({item['token']['id']}): {close}")


def chosen_positions(spec, count):
    """--lens_positions as position numbers: last, all, or a list (negative numbers count from the end)."""
    if spec == "last":
        return [count - 1]
    if spec == "all":
        return list(range(count))
    try:
        chosen = [int(part) for part in spec.split(",")]
    except ValueError:
        raise UserError(f"--lens_positions must be last, all or numbers such as 0,3,-1, not {spec!r}") from None
    for t in chosen:
        if not -count <= t < count:
            raise UserError(f"--lens_positions: position {t} is outside the prompt's {count} tokens")
    return [t % count for t in chosen]


def print_logit_lens(lens, positions_spec):
    """One small table per chosen position, a row per layer: readable however deep the model is."""
    names = [name if i < len(lens["layers"]) - 1 else name + " = output" for i, name in enumerate(lens["layers"])]
    names_width = max(len(name) for name in names)
    print("\nlogit lens: the top 3 next tokens if the model stopped after each layer:")
    for t in chosen_positions(positions_spec, len(lens["positions"])):
        p = lens["positions"][t]
        width = min(12, max(len(show(c["text"])) for layer in p["layers"] for c in layer))
        nxt = f", actual next {show(p['next']['text'])}" if p["next"] else ""
        print(f"position {t}, after {show(p['token']['text'])}{nxt}:")
        for name, layer in zip(names, p["layers"]):
            cells = "  ".join(f"{show(c['text'], width):<{width}} {prob_text(c['prob']):>7}" for c in layer)
            print(f"  {name:<{names_width}}  {cells}")
        # from which layer on the final answer leads: where the model "knows" it
        top_ids = [layer[0]["id"] for layer in p["layers"]]
        since = len(top_ids) - 1
        while since > 0 and top_ids[since - 1] == top_ids[-1]:
            since -= 1
        answer = p["layers"][-1][0]
        entered = next(i for i, layer in enumerate(p["layers"]) if answer["id"] in [c["id"] for c in layer])
        print(f"  {show(answer['text'])} is first in the top 3 at {lens['layers'][entered]}, and the top token "
              f"from {lens['layers'][since]} on")


# ---- putting it together --------------------------------------------------------------------

def check_config(cfg):
    check_sampling_options(cfg)
    if cfg.top < 1:
        raise UserError(f"--top must be at least 1, got {cfg.top}")
    if cfg.generate < 0:
        raise UserError(f"--generate must be 0 or more, got {cfg.generate}")
    if cfg.lens_positions != "last" and not cfg.logit_lens:
        raise UserError("--lens_positions chooses what --logit_lens prints: add --logit_lens")
    if (cfg.layer != -1 or cfg.head != -1) and not cfg.attention:
        raise UserError("--layer and --head choose what --attention draws: add --attention=PATH.png")
    if cfg.attention:
        if not cfg.attention.lower().endswith(".png"):
            raise UserError(f"--attention needs a .png file name, got {cfg.attention!r}")
        try:
            import matplotlib.figure  # noqa: F401
        except ImportError:
            raise UserError("--attention needs matplotlib: pip install matplotlib") from None


def explain(cfg):
    """Everything asked for, as one JSON-able dict (the tables are printed from it)."""
    device = resolve_device(cfg.device)
    model, tokenizer, source = load_model(cfg.init_from, cfg.out_dir, device=device,
                                          dtype=pick_dtype(cfg.dtype, device.split(":")[0]), quant=cfg.quant)
    lora_checkpoint = {}
    if cfg.compare_base:
        if source["step"] is not None:  # a checkpoint trained here: it may hold an adapter
            lora_checkpoint = load_checkpoint(source["path"])
        if "lora" not in lora_checkpoint:
            raise UserError(f"--compare_base compares a LoRA run with its base, and {source['path']} is not a LoRA run")
    model.eval()
    config = model.config
    for name, value, limit in (("layer", cfg.layer, config.n_layer), ("head", cfg.head, config.n_head)):
        if not -1 <= value < limit:
            raise UserError(f"--{name}={value} is out of range: this model has {limit} {name}s "
                            f"(0..{limit - 1}, or -1 for all)")

    doc = {"checkpoint": {"path": source["path"], "init_from": source["init_from"], "step": source["step"],
                          "arch": config.arch,
                          "parameters": model.num_params(), "n_layer": config.n_layer, "n_head": config.n_head,
                          "n_embd": config.n_embd, "block_size": config.block_size,
                          "tokenizer": tokenizer.kind, "vocab_size": config.vocab_size}}
    # --neighbors on its own needs no prompt
    wants_prompt = (bool(cfg.prompt) or not cfg.neighbors or cfg.generate or cfg.attention or cfg.logit_lens
                    or cfg.compare_base)
    if wants_prompt:
        ids, _ = read_prompt(cfg.prompt, tokenizer, source["sample_prompt"])
        cropped = max(0, len(ids) - config.block_size)
        ids = ids[cropped:]  # the model sees at most block_size tokens: keep the last ones
        doc["prompt"] = {"tokens": len(ids), "cropped": cropped}
        doc["tokens"] = [{"position": i, **token_info(tokenizer, t)} for i, t in enumerate(ids)]
        if cfg.logit_lens:
            chosen_positions(cfg.lens_positions, len(ids))  # a bad choice is refused before the model runs
        logits, weights, residuals = forward_with_internals(model, ids, attention=bool(cfg.attention),
                                                            residuals=cfg.logit_lens)
        doc["positions"], doc["summary"] = explain_prompt(logits, ids, tokenizer, cfg.top)
        if cfg.compare_base:
            base_model, _ = lora_base_from_checkpoint(lora_checkpoint)
            base_logits, _, _ = forward_with_internals(base_model.to(device).eval(), ids)
            doc["compare_base"] = {"base": lora_checkpoint["lora"]["base"],
                                   **compare_with_base(base_logits, logits, ids, tokenizer, cfg.top)}
        if cfg.generate:
            doc["generation"] = explain_generation(model, tokenizer, ids, cfg)
        if cfg.attention:
            layers = list(range(config.n_layer)) if cfg.layer == -1 else [cfg.layer]
            heads = list(range(config.n_head)) if cfg.head == -1 else [cfg.head]
            chosen = weights[layers][:, heads].cpu()
            if cfg.json and chosen.numel() > MAX_JSON_ATTENTION:
                raise UserError(f"{chosen.numel():,} attention weights are too many for --json; pick one --layer "
                                "and --head, or a shorter prompt")
            directory = os.path.dirname(os.path.abspath(cfg.attention))
            try:
                os.makedirs(directory, exist_ok=True)
                draw_attention(cfg.attention, chosen.numpy(), attention_labels(doc["tokens"]), layers, heads)
            except OSError as e:
                raise UserError(f"cannot write {cfg.attention}: {e.strerror or e}") from None
            # a tensor until printed: as Python lists, a big model's weights would take gigabytes
            doc["attention"] = {"png": cfg.attention, "layers": layers, "heads": heads, "weights": chosen}
        if cfg.logit_lens:
            doc["logit_lens"] = logit_lens(model, tokenizer, ids, residuals)
    if cfg.neighbors:
        try:
            neighbor_ids = tokenizer.encode(cfg.neighbors)
        except UserError as e:
            raise UserError(f"--neighbors: {e}") from None
        doc["neighbors"] = nearest_embeddings(model, tokenizer, neighbor_ids, cfg.top)
    return doc


def print_tables(doc, cfg):
    c = doc["checkpoint"]
    origin = f"step {c['step']}" if c["step"] is not None else "imported"
    print(f"model: {c['path']}, {c['arch']}, {c['parameters']:,} parameters, {origin}, "
          f"{c['tokenizer']} tokenizer ({c['vocab_size']} tokens), context {c['block_size']}")
    if "tokens" in doc:
        if doc["prompt"]["cropped"]:
            print(f"note: the prompt is longer than the context; its first {doc['prompt']['cropped']} tokens "
                  f"were cropped and the last {c['block_size']} are explained")
        print_tokens(doc)
        print_prompt_table(doc, cfg.top)
    if "compare_base" in doc:
        print_comparison(doc["compare_base"], doc["compare_base"]["base"])
    if "generation" in doc:
        print_generation(doc["generation"], cfg.top)
    if "attention" in doc:
        print_attention(doc["attention"], doc["tokens"])
    if "logit_lens" in doc:
        print_logit_lens(doc["logit_lens"], cfg.lens_positions)
    if "neighbors" in doc:
        print_neighbors(doc["neighbors"])


def main():
    cfg = parse_config(ExplainConfig, sys.argv[1:], USAGE)
    check_config(cfg)
    doc = explain(cfg)
    if cfg.json:
        print(json.dumps(doc, default=lambda tensor: tensor.tolist()))
    else:
        print_tables(doc, cfg)


if __name__ == "__main__":
    main_guard(main)
