"""explain.py shows the model's real numbers; plot.py draws the loss curve (and is optional)."""

import json
import math
import os
import struct

import pytest
import torch
import torch.nn.functional as F

import explain
from conftest import TINY_MODEL, assert_clean_error, learnable_corpus
from conftest import run_script as run_script_threaded
from model.checkpoint import load_checkpoint, model_from_checkpoint
from model.cli import parse_config
from model.errors import UserError
from model.gpt import GPT, GPTConfig
from model import loss_plot
from model.tokenizer import train_bpe

PROMPT = "alpha bravo charlie delta"  # 25 characters: inside the tiny model's 32-token context
GENERATION = ["--generate=6", "--temperature=0.9", "--top_k=4", "--top_p=0.8", "--seed=7"]


def run_script(*args, env=None, **kwargs):
    """conftest's run_script on one thread: tiny models gain nothing from more, and on a busy
    machine threads waiting for each other make a run several times slower."""
    return run_script_threaded(*args, env={"OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


def png_size(path):
    """(width, height) from a PNG's header: the signature, then the IHDR chunk."""
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR", path
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    (root / "corpus.txt").write_text(learnable_corpus())
    run_script("data/prepare.py", "tiny", f"--input={root / 'corpus.txt'}", "--tokenizer=char",
               f"--data_root={root / 'data'}")
    return root / "data"


@pytest.fixture(scope="module")
def trained(data_root):
    out_dir = data_root.parent / "out"
    run_script("train.py", *TINY_MODEL, f"--data_root={data_root}", "--dataset=tiny", f"--out_dir={out_dir}",
               "--max_iters=30", "--eval_interval=15", "--learning_rate=3e-3")
    return out_dir


@pytest.fixture(scope="module")
def model_and_tokenizer(trained):
    model, tokenizer = model_from_checkpoint(load_checkpoint(str(trained)))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def explained(trained):
    """One --json run asking for everything; --top=100 is more than the 21-character vocabulary,
    so every probability of the distribution is listed."""
    result = run_script("explain.py", f"--out_dir={trained}", f"--prompt={PROMPT}", "--top=100", *GENERATION,
                        f"--attention={trained / 'attention.png'}", "--logit_lens", "--neighbors=ae",
                        "--device=cpu", "--json")
    return json.loads(result.stdout)


def model_probs(model, ids):
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return logits[0].float().softmax(-1)


def test_json_output_has_every_part(explained):
    assert set(explained) == {"checkpoint", "prompt", "tokens", "positions", "summary", "generation",
                              "attention", "logit_lens", "neighbors"}
    assert explained["checkpoint"]["n_layer"] == 2 and explained["checkpoint"]["tokenizer"] == "char"
    assert "".join(t["text"] for t in explained["tokens"]) == PROMPT
    assert explained["prompt"] == {"tokens": len(PROMPT), "cropped": 0}
    assert set(explained["positions"][0]) == {"position", "token", "top", "next"}
    assert set(explained["positions"][0]["next"]) == {"id", "text", "prob", "rank", "loss"}
    assert explained["positions"][-1]["next"] is None  # the token after the prompt is unknown
    assert set(explained["generation"]["steps"][0]) == {"position", "picked", "filters", "top"}


def test_probabilities_are_the_models_own_softmax(explained, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = [t["id"] for t in explained["tokens"]]
    assert ids == tokenizer.encode(PROMPT)
    probs = model_probs(model, ids)
    losses = []
    for position in explained["positions"]:
        i = position["position"]
        listed = {c["id"]: c["prob"] for c in position["top"]}
        assert len(listed) == tokenizer.vocab_size  # --top above the vocabulary lists all of it
        assert sum(listed.values()) == pytest.approx(1.0, abs=1e-4)
        for token_id, p in listed.items():
            assert p == pytest.approx(float(probs[i, token_id]), abs=1e-5)
        shown = [c["prob"] for c in position["top"]]
        assert shown == sorted(shown, reverse=True)
        if position["next"]:
            target = ids[i + 1]
            nxt = position["next"]
            assert nxt["id"] == target
            assert nxt["prob"] == pytest.approx(float(probs[i, target]), abs=1e-5)
            assert nxt["rank"] == 1 + sum(float(p) > float(probs[i, target]) for p in probs[i])
            assert nxt["loss"] == pytest.approx(-math.log(float(probs[i, target])), abs=1e-4)
            losses.append(nxt["loss"])
    summary = explained["summary"]
    assert summary["predictions"] == len(ids) - 1
    assert summary["perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-6)
    # one byte per character here: bits per byte is the mean loss in bits
    assert summary["bytes"] == len(PROMPT) - 1
    assert summary["bits_per_byte"] == pytest.approx(sum(losses) / math.log(2) / (len(PROMPT) - 1), rel=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_attention_of_every_head_sums_to_one_and_never_looks_ahead(arch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch=arch, vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)).eval()
    ids = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3]
    logits, weights, _ = explain.forward_with_internals(model, ids, attention=True)
    assert weights.shape == (2, 4, len(ids), len(ids))
    assert torch.allclose(weights.sum(-1), torch.ones(2, 4, len(ids)), atol=1e-5)
    future = torch.ones(len(ids), len(ids), dtype=torch.bool).triu(1)
    assert (weights[..., future] == 0).all()
    assert (weights[..., ~future] > 0).all()
    # computing the attention by hand changes nothing the model outputs
    with torch.no_grad():
        plain, _ = model(torch.tensor([ids]))
    assert torch.allclose(logits, plain[0], atol=1e-5)
    assert not any(block.attn.record_attention for block in model.blocks)


def test_attention_in_the_json_is_the_trained_models(explained):
    attention = explained["attention"]
    assert attention["layers"] == [0, 1] and attention["heads"] == [0, 1]
    weights = torch.tensor(attention["weights"])
    n = len(PROMPT)
    assert weights.shape == (2, 2, n, n)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, n), atol=1e-5)
    assert (weights[..., torch.ones(n, n, dtype=torch.bool).triu(1)] == 0).all()


def test_neighbors_scores_are_cosine_similarities_of_input_embeddings(explained, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    table = model.wte.weight[:tokenizer.vocab_size].detach()
    assert [item["token"]["text"] for item in explained["neighbors"]] == ["a", "e"]
    for item in explained["neighbors"]:
        token_id = item["token"]["id"]
        scores = F.cosine_similarity(table, table[token_id][None, :], dim=-1)
        neighbors = item["neighbors"]
        assert len(neighbors) == tokenizer.vocab_size - 1  # every other real token, never itself
        assert token_id not in [n["id"] for n in neighbors]
        for n in neighbors:
            assert n["cosine"] == pytest.approx(float(scores[n["id"]]), abs=1e-5)
        listed = [n["cosine"] for n in neighbors]
        assert listed == sorted(listed, reverse=True)


def test_logit_lens_last_layer_is_the_models_prediction(explained, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    lens = explained["logit_lens"]
    assert lens["layers"] == ["embedding", "block 0", "block 1"]
    ids = [t["id"] for t in explained["tokens"]]
    probs = model_probs(model, ids)
    for position in lens["positions"]:
        last = position["layers"][-1]
        values, indices = probs[position["position"]].topk(3)
        assert [c["id"] for c in last] == indices.tolist()
        assert [c["prob"] for c in last] == pytest.approx(values.tolist(), abs=1e-5)
        assert len(position["layers"]) == 3


def test_logit_lens_residuals_decode_to_the_logits_for_llama_too():
    torch.manual_seed(1)
    model = GPT(GPTConfig(arch="llama", vocab_size=40, block_size=16, n_layer=3, n_head=2, n_embd=32,
                          vocab_pad_multiple=64)).eval()
    ids = [1, 2, 3, 5, 8, 13, 21]
    logits, _, residuals = explain.forward_with_internals(model, ids, residuals=True)
    assert residuals.shape == (4, len(ids), 32)  # the embedding, then after each of the 3 blocks
    with torch.no_grad():
        decoded = model.lm_head(model.ln_f(residuals[-1]))[:, :40]
    assert torch.allclose(decoded, logits, atol=1e-5)
    assert logits.shape == (len(ids), 40)  # padded embedding rows are never scored


def test_generation_reports_what_top_k_and_top_p_cut(explained, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    generation = explained["generation"]
    tokens = tokenizer.encode(PROMPT)
    assert len(generation["steps"]) == 6
    for step in generation["steps"]:
        logits = model_probs(model, tokens)[-1].log()  # logits up to a constant
        tempered = (logits / 0.9).softmax(-1)
        order = tempered.argsort(descending=True).tolist()
        top4 = order[:4]
        renormalised = tempered[top4] / tempered[top4].sum()
        # top-p keeps the fewest of the top-4 whose renormalised probability reaches 0.8
        kept_p = next(n for n in range(1, 5) if float(renormalised[:n].sum()) >= 0.8)
        filters = step["filters"]
        assert filters["top_k"]["k"] == 4 and filters["top_k"]["kept"] == 4
        assert filters["top_k"]["mass"] == pytest.approx(float(tempered[top4].sum()), abs=1e-5)
        assert filters["top_p"]["kept"] == kept_p
        survivors = top4[:kept_p]
        assert filters["top_p"]["mass"] == pytest.approx(float(tempered[survivors].sum()), abs=1e-5)
        picked = step["picked"]
        assert picked["id"] in survivors
        expected = float(tempered[picked["id"]] / tempered[survivors].sum())
        assert picked["sampling_prob"] == pytest.approx(expected, abs=1e-5)
        tokens.append(picked["id"])
    assert generation["text"] == tokenizer.decode(tokens[len(PROMPT):])


def test_generated_text_is_what_sample_py_writes_with_the_same_settings(explained, trained):
    result = run_script("sample.py", f"--out_dir={trained}", f"--prompt={PROMPT}", "--max_new_tokens=6",
                        "--temperature=0.9", "--top_k=4", "--top_p=0.8", "--seed=7", "--kv_cache=false",
                        "--device=cpu")
    assert result.stdout == PROMPT + explained["generation"]["text"] + "\n"


def test_pictures_have_the_expected_pixel_size(explained, trained):
    layout = explain.attention_layout(2, 2, explain.attention_labels(explained["tokens"]))
    assert png_size(trained / "attention.png") == (layout["width"], layout["height"])
    assert png_size(trained / "loss.png") == (800, 500)  # drawn by train.py at each evaluation
    os.remove(trained / "loss.png")
    result = run_script("plot.py", str(trained))
    assert "loss.png" in result.stdout
    assert png_size(trained / "loss.png") == (800, 500)
    assert not [name for name in os.listdir(trained) if "tmp" in name]


def test_text_tables_show_tokens_probabilities_and_choices(trained, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("echo golf " * 4)  # 40 characters: longer than the context
    picture = tmp_path / "pictures" / "head.png"
    result = run_script("explain.py", f"--out_dir={trained}", f"--prompt=FILE:{prompt_file}", "--top=3",
                        "--generate=3", "--temperature=0", f"--attention={picture}", "--layer=1", "--head=0",
                        "--logit_lens", "--neighbors=o", "--device=cpu")
    out = result.stdout
    assert "first 8 tokens were cropped" in out
    assert "'·'(1)" in out  # spaces are made visible, with their ids
    for text in ["top 3 candidates", "perplexity", "bits per byte", "greedy", "continuation:",
                 "layer 1 head 0", "logit lens", "block 1 = output", "nearest input embeddings"]:
        assert text in out, text
    layout = explain.attention_layout(1, 1, explain.attention_labels([{"text": c} for c in ("echo golf " * 4)[8:]]))
    assert png_size(picture) == (layout["width"], layout["height"])


def test_tokens_show_whitespace_and_partial_characters():
    tokenizer = train_bpe(["a b"], 257)  # bytes only: 'é' is two tokens, neither a whole character
    first, second = [explain.token_info(tokenizer, i) for i in tokenizer.encode("é")]
    assert (first["text"], second["text"]) == ("\\xc3", "\\xa9")
    assert explain.show(" x\n\t") == "'·x\\n\\t'"
    assert explain.show("a" * 40, width=10) == "'aaaaaaa…'"


def test_log_history_follows_the_latest_run(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [{"step": 0, "tokens": 0, "train_loss": 3.0, "val_loss": 3.0, "val_bpb": 4.0, "lr": 0.0},
               {"step": 10, "tokens": 100, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 1.0},
               {"step": 20, "tokens": 200, "loss": 1.9, "lr": 1e-3, "tokens_per_s": 1.0},
               # resumed from a checkpoint at step 10: steps 20.. are done again
               {"step": 20, "tokens": 200, "loss": 1.8, "lr": 1e-3, "tokens_per_s": 1.0},
               {"step": 20, "tokens": 200, "train_loss": 1.8, "val_loss": 1.9, "val_bpb": 2.0, "lr": 1e-3}]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n{\"step\": 3")  # and a line cut short
    assert [r.get("loss", r.get("val_loss")) for r in loss_plot.read_log(log)] == [3.0, 2.0, 1.8, 1.9]
    log.write_text(log.read_text() + "\n" + json.dumps(records[0]) + "\n")  # a new run from scratch
    assert loss_plot.read_log(log) == [records[0]]
    assert loss_plot.plot_log(str(log), str(tmp_path / "loss.png"))
    assert png_size(tmp_path / "loss.png") == (800, 500)


def test_without_matplotlib_training_runs_and_says_so_once(data_root, trained, tmp_path):
    no_matplotlib = tmp_path / "no_matplotlib"
    no_matplotlib.mkdir()
    (no_matplotlib / "matplotlib.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = {"PYTHONPATH": str(no_matplotlib)}
    out_dir = tmp_path / "out"
    result = run_script("train.py", *TINY_MODEL, f"--data_root={data_root}", "--dataset=tiny",
                        f"--out_dir={out_dir}", "--max_iters=4", "--eval_interval=2", env=env)
    assert result.stderr.count("pip install matplotlib") == 1  # three evaluations, one note
    assert (out_dir / "ckpt.pt").exists() and not (out_dir / "loss.png").exists()
    assert_clean_error(run_script("plot.py", str(out_dir), env=env, check=False))
    assert_clean_error(run_script("explain.py", f"--out_dir={trained}", "--attention=a.png", env=env, check=False))


def test_bad_input_is_refused_clearly(trained, tmp_path):
    assert_clean_error(run_script("explain.py", f"--out_dir={tmp_path / 'nothing'}", check=False))
    assert_clean_error(run_script("explain.py", f"--out_dir={trained}", "--prompt=ALPHA", check=False))  # unseen chars
    assert_clean_error(run_script("explain.py", f"--out_dir={trained}", "--attention=a.png", "--layer=2", check=False))
    assert_clean_error(run_script("plot.py", str(tmp_path / "nothing"), check=False))
    # the same checks, in-process (each of these is a UserError: `error: ...`, exit 2, from the command line)
    bad = [["--neighbors=Z"], ["--attention=a.png", "--head=-2"], ["--attention=a.png", "--head=2"],
           ["--attention=a.jpg"], ["--layer=0"], ["--top=0"], ["--generate=-1"], ["--top_p=0"],
           [f"--prompt=FILE:{tmp_path / 'missing.txt'}"]]
    for args in bad:
        cfg = parse_config(explain.ExplainConfig, [f"--out_dir={trained}", "--device=cpu", *args], explain.USAGE)
        with pytest.raises(UserError):
            explain.check_config(cfg)
            explain.explain(cfg)


def test_logit_lens_prints_one_row_per_layer_for_the_chosen_positions(capsys):
    """A deep model's lens stays readable: a row per layer, for the positions asked for."""
    def layer(*ids):
        return [{"id": i, "text": f"t{i}", "prob": 0.5 / (k + 1)} for k, i in enumerate(ids)]

    names = ["embedding"] + [f"block {i}" for i in range(30)]
    tops = [[7, 8, 9]] * 10 + [[8, 9, 5]] * 10 + [[9, 5, 6]] * 6 + [[5, 9, 6]] * 5  # 5 leads from block 25 on
    lens = {"layers": names, "positions": [
        {"position": t, "token": {"id": t, "text": f"p{t}"}, "next": None, "layers": [layer(*top) for top in tops]}
        for t in range(4)]}
    explain.print_logit_lens(lens, "0,-1")
    out = capsys.readouterr().out
    assert "position 0, after 'p0'" in out and "position 3, after 'p3'" in out and "position 1," not in out
    assert "block 29 = output" in out and max(len(line) for line in out.splitlines()) < 100
    assert out.count("block 12 ") == 2  # one row per layer in each position's table
    assert "'t5' is first in the top 3 at block 9, and the top token from block 25 on" in out
    with pytest.raises(UserError):
        explain.chosen_positions("0,7", 4)
