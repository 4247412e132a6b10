"""Measured speed, side by side, in one run on this machine.

    python bench.py                       # everything, printed as one table
    python bench.py --json                # the same figures as JSON
    python bench.py --sections=generate   # only some: train, generate, runpy, tokenizer, hf, gguf, lora, recipe, rag
    python bench.py --sections=gguf --gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf   # ...and a real GGUF file
    python bench.py --train_config=configs/gpt2_124m.toml --compile_too   # a GPU training figure

What it measures:
  train      tokens/s and peak memory of the real training loop (train.py in a subprocess) for
             named model shapes; with --compile_too also under torch.compile
  generate   tokens/s of sample.py's generation (model.generate) with and without the KV cache,
             at a context of 256 and of 1024, for a 6-layer, 384-wide model
  runpy      sample.py and run.py (numpy only) as whole processes on the same model and prompt:
             time to first token (start-up included) and tokens/s
  tokenizer  time to train a 4096-token BPE on the default corpus, and encoding throughput
  hf         imported GPT-2 shapes (random weights saved by transformers, no download): import
             time and peak memory for 124M and 350M, and greedy generation of the 124M model
             here against transformers' own generate on the same weights
  gguf       GGUF import (--init_from=FILE.gguf): time and peak memory of a SmolLM2-135M-shaped
             model (random weights) written here as f32, q8_0 and q4_0, each read in a fresh process,
             and of --gguf_file when given (a real file: its 49,152-token vocabulary is parsed too)
  lora       full fine-tuning against LoRA (r=8 on q,v) on the same base: step time and peak
             memory of a GPT-2-124M-shaped model (random weights, each in its own process),
             checkpoint sizes, and the val loss on a fine-tuning set (the standard library's
             tests) after the same wall time, from a small model trained on the default corpus
  recipe     the training recipe's ablation on Tiny Shakespeare (data/shakespeare_char): nanoGPT's
             CPU recipe, each change alone on top of it, and configs/shakespeare_char_cpu.toml;
             val loss after the same wall time and the seconds to reach val 1.90
  rag        rag.py's search over 10^4 and 10^5 chunks: the vector index (a float32 matrix of
             384-dimensional unit rows times the query, then the top 5) and BM25 (chunks of the
             standard library's source, repeated to the count), with the memory each needs
  real       a real model (--model=hf:<folder> or <file>.gguf): our generation in float32 and with
             8-bit weights (--quant=q8_0), transformers' generate on the same weights and, when
             llama-cpp-python is installed, llama.cpp on the GGUF files given by --gguf: greedy
             tokens/s after the first token, time to the first token of a 500-token prompt,
             peak memory, and bits per byte on held-out text (--text), each program in its own process;
             for ours also the bytes of weights a token reads, and so the memory speed it runs at
Every figure is the median of several repeats after a warm-up (the real section's speeds: the
best of its repeats, the programs taking turns in --real_rounds rounds); ratios compare figures
from this same run, never numbers from elsewhere.
"""

import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.cli import field, main_guard, parse_config, resolve_device
from model.errors import UserError
from model.checkpoint import checkpoint_of, save_checkpoint
from model.gpt import GPT, GPTConfig

REPO = os.path.dirname(os.path.abspath(__file__))
USAGE = "usage: python bench.py [--sections=train,generate,runpy,tokenizer,hf,gguf,lora,recipe,rag,real] [--json] [--field=value ...]"
SECTIONS = ("train", "generate", "runpy", "tokenizer", "hf", "gguf", "lora", "recipe", "rag", "real")

# The training shapes of the CPU benchmark: the Shakespeare CPU recipe's model, and the
# well-known GPU recipe's model at a short batch.
TRAIN_SHAPES = {
    "4x128 ctx64 b12": ["--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=12"],
    "6x384 ctx256 b8": ["--n_layer=6", "--n_head=6", "--n_embd=384", "--block_size=256", "--batch_size=8"],
}


@dataclass
class BenchConfig:
    sections: str = field("train,generate,runpy,tokenizer", "comma-separated sections to run (also: hf, gguf, lora, recipe, rag)")
    device: str = field("auto", "auto | cpu | cuda | mps")
    repeats: int = field(3, "timed repeats per figure (the median is reported)")
    train_steps: int = field(40, "training steps per measurement (the first 10 are warm-up)")
    train_config: str = field("", "a preset to measure instead of the CPU shapes, e.g. configs/gpt2_124m.toml")
    dataset: str = field("pystdlib", "prepared data set the training figures read")
    data_root: str = field("data", "folder holding prepared data sets")
    compile_too: bool = field(False, "also measure training under torch.compile")
    new_tokens: int = field(500, "tokens generated per repeat at context 256 (context 1024 uses a fifth)")
    gguf_file: str = field("", "gguf: also measure importing this .gguf file")
    lora_steps: int = field(3, "lora: timed training steps of the 124M-shaped model per way (after one warm-up)")
    lora_seconds: float = field(60.0, "lora: wall time each way fine-tunes the small model for")
    lora_base: str = field("", "lora: the small base checkpoint (trained on pystdlib; '' = train one for 300 steps)")
    recipe_seconds: float = field(90.0, "recipe: wall-clock budget of each training run")
    recipe_dataset: str = field("shakespeare_char", "recipe: the prepared character-level data set")
    recipe_seeds: int = field(1, "recipe: runs per variant with different seeds (mean and spread reported)")
    recipe_variants: str = field("", "recipe: comma-separated variant names to run ('' = all)")
    model: str = field("", "real: the model, hf:<folder or owner/name> or <file>.gguf")
    gguf: str = field("", "real: comma-separated GGUF files for llama.cpp to run (e.g. its F32, Q8_0 and Q4_1 files)")
    text: str = field("", "real: held-out text for bits per byte and the long prompt ('' = the LICENSE.txt "
                      "that ships with Python)")
    real_tokens: int = field(128, "real: greedy tokens generated per repeat")
    real_rounds: int = field(2, "real: rounds in which the programs take turns (each figure: the best)")
    prompt_tokens: int = field(500, "real: length of the prompt whose time to first token is measured")
    bpb_tokens: int = field(2048, "real: tokens of the held-out text scored for bits per byte (windows of 512)")
    json: bool = field(False, "print the figures as JSON instead of a table")


def median_time(function, repeats, warmup=1):
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_train(cfg, device, rows):
    shapes = {os.path.basename(cfg.train_config): [cfg.train_config]} if cfg.train_config else TRAIN_SHAPES
    warmup = 2  # log records (of 5 steps each) skipped: start-up, allocation, compilation
    for name, shape in shapes.items():
        for compiled in ([False, True] if cfg.compile_too else [False]):
            with tempfile.TemporaryDirectory() as out_dir:
                command = [sys.executable, "train.py", *shape, f"--dataset={cfg.dataset}", f"--data_root={cfg.data_root}",
                           f"--out_dir={out_dir}",
                           f"--max_iters={cfg.train_steps}", "--eval_interval=1000000000", "--eval_iters=1",
                           "--log_interval=5", "--sample_tokens=0", "--plot=false", f"--device={device}",
                           f"--compile={compiled}"]
                run_command(command, "training")
                with open(os.path.join(out_dir, "log.jsonl")) as f:
                    records = [json.loads(line) for line in f]
            steps = [r for r in records if "tokens_per_s" in r][warmup:]
            setting = f"{name}{', compiled' if compiled else ''}"
            rows.append(("train tokens/s", setting, statistics.median(r["tokens_per_s"] for r in steps), "tok/s"))
            rows.append(("train peak memory", setting, steps[-1]["peak_memory_mb"], "MiB"))
            if "mfu" in steps[-1]:
                rows.append(("train MFU", setting, 100 * statistics.median(r["mfu"] for r in steps), "%"))


def generation_model(block_size, device):
    torch.manual_seed(0)
    config = GPTConfig(arch="gpt2", vocab_size=4096, block_size=block_size, n_layer=6, n_head=6, n_embd=384)
    return GPT(config).to(device).eval()


def bench_generate(cfg, device, rows, results):
    for context in (256, 1024):
        model = generation_model(context, device)
        new_tokens = cfg.new_tokens if context == 256 else max(1, cfg.new_tokens // 5)
        prompt = torch.randint(0, 4096, (context // 2,), generator=torch.Generator().manual_seed(1)).tolist()
        speeds = {}
        for use_cache in (True, False):
            def run_once():
                generator = torch.Generator(device=device).manual_seed(0)
                for _ in model.generate(prompt, new_tokens, temperature=1.0, generator=generator,
                                        use_kv_cache=use_cache):
                    pass
            seconds = median_time(run_once, cfg.repeats)
            speeds[use_cache] = new_tokens / seconds
            label = "with KV cache" if use_cache else "recomputing the context"
            rows.append(("sample.py generation", f"ctx {context}, {new_tokens} new, {label}", speeds[use_cache], "tok/s"))
        rows.append(("KV cache speed-up", f"ctx {context}", speeds[True] / speeds[False], "x"))
        results[context] = (model, prompt, new_tokens, speeds[True])


DEFAULT_SHAPE = dict(arch="gpt2", vocab_size=1024, block_size=128, n_layer=4, n_head=4, n_embd=128)  # configs/default.toml's


def bench_runpy(cfg, rows, results):
    """sample.py and run.py, whole processes, run the way a user runs them on the same weights
    and prompt: the in-process context-256 figure's 10.8M model, and a model of the default
    run's shape (0.94M parameters), where per-operation overhead, not memory, sets the pace.
    export.py writes model.bin from the checkpoint, then the two scripts take turns. Each reports
    its time to first token (from its start, imports included) and its tokens/s after the first."""
    model, prompt, new_tokens, _ = results[256]
    torch.manual_seed(0)
    default_model = GPT(GPTConfig(**DEFAULT_SHAPE)).eval()
    default_prompt = torch.randint(0, 1024, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    cases = [("10.8M, ctx 256", model.cpu(), prompt, new_tokens),
             ("0.94M (default), ctx 128", default_model, default_prompt, 128 - 32 - 1)]
    for name, case_model, case_prompt, case_tokens in cases:
        tokenizer = bench_tokenizer(case_model.config.vocab_size)
        prompt_text = tokenizer.decode(case_prompt)  # one character per id: both scripts read back exactly these ids
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(checkpoint_of(case_model, tokenizer), os.path.join(directory, "ckpt.pt"))
            run_command([sys.executable, "export.py", f"--out_dir={directory}"], "export")
            commands = {
                "sample.py": [sys.executable, "sample.py", f"--out_dir={directory}", "--device=cpu"],
                "run.py": [sys.executable, "run.py", os.path.join(directory, "model.bin")],
            }
            figures = {script: [] for script in commands}
            for repeat in range(cfg.repeats + 1):  # the first is a warm-up (file cache, imports)
                for script, command in commands.items():
                    output = run_command(command + [f"--prompt={prompt_text}", f"--max_new_tokens={case_tokens}",
                                                    "--temperature=1.0", "--seed=0"], script)
                    if repeat:
                        figures[script].append(script_speed(output.stderr))
        speeds = {script: statistics.median(speed for speed, _ in figures[script]) for script in commands}
        for script in commands:
            rows.append((f"{script} tokens/s", f"{name}, {case_tokens} new (CPU)", speeds[script], "tok/s"))
            rows.append((f"{script} first token", f"{name}, from the start of the process",
                         statistics.median(first for _, first in figures[script]), "s"))
        rows.append(("sample.py vs run.py", f"{name}: tokens/s", speeds["sample.py"] / speeds["run.py"], "x"))


def script_speed(stderr):
    """(tokens/s, seconds to the first token) from the last line sample.py and run.py print:
    [N tokens in X s, R tokens/s; first token after T s]"""
    last = stderr.strip().splitlines()[-1]
    rate = float(last.split(" s, ", 1)[1].split()[0])
    first = float(last.rsplit("first token after ", 1)[1].split()[0])
    return rate, first


def bench_tokenizer(vocab_size):
    """A character tokenizer with one (CJK) character per id, to export with the generation
    model: any text made of them encodes back to exactly the ids it was decoded from."""
    from model.tokenizer import CharTokenizer

    return CharTokenizer([chr(0x4E00 + i) for i in range(vocab_size)])


def run_command(command, what):
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["(no output)"]
        raise UserError(f"{what} benchmark failed: {lines[-1]}")
    return result


def bench_bpe(cfg, rows):
    from data.dataset import STDLIB, read_documents
    from model.tokenizer import train_bpe

    documents, _ = read_documents(STDLIB, "data", "train", "text", 0)
    megabytes = sum(len(d.encode("utf-8")) for d in documents) / 1e6
    tokenizer = None

    def train_once():
        nonlocal tokenizer
        tokenizer = train_bpe(documents, 4096)
    rows.append(("BPE training", f"4096 ids on the stdlib corpus ({megabytes:.1f} MB)",
                 median_time(train_once, cfg.repeats, warmup=0), "s"))
    seconds = median_time(lambda: tokenizer.encode_batch(documents), cfg.repeats)
    rows.append(("BPE encoding", "encode_batch, the same corpus", megabytes / seconds, "MB/s"))


# GPT-2 small and medium, as transformers' GPT2Config calls the sizes
HF_SHAPES = {"124M": dict(n_layer=12, n_head=12, n_embd=768), "350M": dict(n_layer=24, n_head=16, n_embd=1024)}
# The peak is read from /proc (VmHWM, Linux): getrusage's maxrss can carry over the parent's
# peak into a child process, and the parent here has just built the model with transformers.
IMPORT_PROBE = """
import json, sys, time
def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
from model.hf import load_hf_model
before = peak_mb()  # Python, torch and our code
started = time.perf_counter()
model, _ = load_hf_model(sys.argv[1])
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb(), "before_mb": before,
                  "float32_mb": sum(p.numel() for p in model.parameters()) * 4 / 2**20}))
"""


def bench_hf(cfg, device, rows):
    """Import cost (a fresh process per shape: its peak memory is the import's) and generation
    speed against transformers, the reference implementation, on the same random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from model.hf import load_hf_model

    with tempfile.TemporaryDirectory() as directory:
        for name, shape in HF_SHAPES.items():
            folder = os.path.join(directory, name)
            torch.manual_seed(0)
            GPT2LMHeadModel(GPT2Config(**shape)).save_pretrained(folder)
            # a byte-level tokenizer with no merges: the tokenizer plays no part in these figures
            from model.tokenizer import BytePairTokenizer, tokenizer_json

            with open(os.path.join(folder, "tokenizer.json"), "w") as f:
                json.dump(tokenizer_json(BytePairTokenizer("bpe", {bytes([i]): i for i in range(256)})), f)
            probe = json.loads(run_command([sys.executable, "-c", IMPORT_PROBE, folder], "import").stdout)
            rows.append(("import (hf: folder)", f"GPT-2 {name} shape, safetensors", probe["seconds"], "s"))
            rows.append(("import peak memory", f"GPT-2 {name} shape ({probe['float32_mb']:,.0f} MiB float32)",
                         probe["peak_rss_mb"], "MiB"))
            # what the import itself adds, beyond the ~0.4 GB any process holding torch starts with
            rows.append(("import memory / model size", f"GPT-2 {name} shape, peak minus the process before",
                         (probe["peak_rss_mb"] - probe["before_mb"]) / probe["float32_mb"], "x"))
        folder = os.path.join(directory, "124M")
        ours, _ = load_hf_model(folder)
        ours = ours.to(device)
        theirs = GPT2LMHeadModel.from_pretrained(folder).to(device).eval()
        prompt = torch.randint(0, 50257, (16,), generator=torch.Generator().manual_seed(1)).tolist()
        new_tokens = max(2, cfg.new_tokens // 5)

        def ours_first():
            next(ours.generate(prompt, 1, temperature=0))

        def ours_all():
            for _ in ours.generate(prompt, new_tokens, temperature=0):
                pass

        input_ids = torch.tensor([prompt], device=device)

        def theirs_generate(count):
            with torch.no_grad():  # greedy, and never stopping early at an end-of-text token
                theirs.generate(input_ids, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                                pad_token_id=0)

        speeds = {}
        for who, first, whole in (("here", ours_first, ours_all),
                                  ("transformers", lambda: theirs_generate(1), lambda: theirs_generate(new_tokens))):
            rows.append(("GPT-2 124M time to first token", f"{who}, 16-token prompt", median_time(first, cfg.repeats), "s"))
            speeds[who] = new_tokens / median_time(whole, cfg.repeats)
            rows.append(("GPT-2 124M greedy generation", f"{who}, {new_tokens} new tokens", speeds[who], "tok/s"))
        rows.append(("generation here vs transformers", "GPT-2 124M", speeds["here"] / speeds["transformers"], "x"))

# SmolLM2-135M's shape (the real model this repository's GGUF figures use)
GGUF_SHAPE = dict(arch="llama", vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                  mlp_hidden=1536, norm_eps=1e-5, rope_theta=100000.0)
GGUF_PROBE = IMPORT_PROBE.replace("from model.hf import load_hf_model", "from model.gguf import load_gguf_model") \
    .replace("load_hf_model(sys.argv[1])", "load_gguf_model(sys.argv[1])")


def bench_gguf(cfg, rows):
    """GGUF import: each file read in a fresh process, so its peak memory is the import's."""
    from model.gguf import save_gguf_model
    from model.tokenizer import BytePairTokenizer

    def measure(path, setting):
        probe = json.loads(run_command([sys.executable, "-c", GGUF_PROBE, path], "gguf import").stdout)
        rows.append(("import (.gguf)", setting, probe["seconds"], "s"))
        rows.append(("import peak memory", f"{setting} ({probe['float32_mb']:,.0f} MiB float32)",
                     probe["peak_rss_mb"], "MiB"))
        rows.append(("import memory / model size", f"{setting}, peak minus the process before",
                     (probe["peak_rss_mb"] - probe["before_mb"]) / probe["float32_mb"], "x"))

    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**GGUF_SHAPE))
        tokenizer = BytePairTokenizer("bpe", {bytes([i]): i for i in range(256)})  # the tokenizer plays no part
        for quant in ("f32", "q8_0", "q4_0"):
            path = os.path.join(directory, f"{quant}.gguf")
            save_gguf_model(model, tokenizer, path, quant)
            measure(path, f"SmolLM2-135M shape, {quant} ({os.path.getsize(path) / 2**20:,.0f} MiB file)")
        del model
    if cfg.gguf_file:
        measure(cfg.gguf_file, f"{os.path.basename(cfg.gguf_file)} ({os.path.getsize(cfg.gguf_file) / 2**20:,.0f} MiB)")


# ---- full fine-tuning against LoRA -------------------------------------------------------------

LORA_RANK, LORA_TARGETS = 8, ["q", "v"]
LORA_BATCH, LORA_CONTEXT = 1, 128  # the 124M-shaped model's batch: a few CPU seconds per step


class ByteCounter:
    """A file that only counts what is written to it: a checkpoint's size without the disk."""

    def __init__(self):
        self.size = 0

    def write(self, data):
        self.size += len(data)
        return len(data)

    def flush(self):
        pass


def saved_size(obj):
    counter = ByteCounter()
    torch.save(obj, counter)
    return counter.size


def prepare_fine_tuning(model, way):
    """Freeze for LoRA (adapters on q, v) or leave every weight trainable; the optimizer train.py builds."""
    from model import lora
    from model.optimizer import make_optimizer

    if way == "lora":
        lora.add_lora(model, LORA_RANK, 2.0 * LORA_RANK, 0.0, LORA_TARGETS)
    learning_rate = 2e-3 if way == "lora" else 3e-4  # each way's usual scale (adapters start at zero)
    return make_optimizer(model, model.wte.weight.device.type, learning_rate=learning_rate, weight_decay=0.0)


def lora_step_figures(way, steps, device):
    """Run in a process of its own (peak memory is per process): train a GPT-2-124M-shaped model
    with random weights for `steps` steps one way; print step time, peak memory, checkpoint sizes."""
    import resource

    from model import lora

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=LORA_CONTEXT)).to(device)
    base_bytes = saved_size(model.state_dict())
    optimizer = prepare_fine_tuning(model, way)
    x = torch.randint(0, model.config.vocab_size, (LORA_BATCH, LORA_CONTEXT + 1), device=device)
    times = []
    for step in range(steps + 1):  # the first is a warm-up: allocations
        started = time.perf_counter()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    weights = lora.adapter_state_dict(model) if way == "lora" else model.state_dict()
    checkpoint = saved_size({"model": weights, "optimizer": optimizer.state_dict()})
    print(json.dumps({"step_s": statistics.median(times[1:]), "peak_bytes": peak, "checkpoint_bytes": checkpoint,
                      "base_bytes": base_bytes,
                      "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}))


@torch.no_grad()
def validation_loss(model, loader, batches=20):
    model.eval()
    total = sum(float(model(*loader.eval_batch(i))[1]) for i in range(batches))
    model.train()
    return total / batches


def bench_lora(cfg, device, rows):
    ways = {"full": "full fine-tuning", "lora": f"LoRA r={LORA_RANK} on {','.join(LORA_TARGETS)}"}
    # 1. speed and memory, GPT-2-124M-shaped, each way in its own process
    figures = {}
    for way in ways:
        code = f"import bench; bench.lora_step_figures({way!r}, {cfg.lora_steps}, {device!r})"
        result = run_command([sys.executable, "-c", code], "LoRA")
        figures[way] = json.loads(result.stdout.strip().splitlines()[-1])
    shape = f"124M shape, {LORA_BATCH}x{LORA_CONTEXT} tokens"
    for way, name in ways.items():
        f = figures[way]
        rows.append((f"{name}: trainable", "124M shape", f["trainable"], "params"))
        rows.append((f"{name}: step time", shape, f["step_s"], "s"))
        rows.append((f"{name}: peak memory", shape, f["peak_bytes"] / 2**20, "MiB"))
        rows.append((f"{name}: checkpoint", "weights + optimizer state", f["checkpoint_bytes"] / 1e6, "MB"))
    full, lora_figures = figures["full"], figures["lora"]
    rows.append(("LoRA / full: step time", shape, lora_figures["step_s"] / full["step_s"], "x"))
    rows.append(("LoRA / full: peak memory", shape + " (goal <= 0.60)", lora_figures["peak_bytes"] / full["peak_bytes"], "x"))
    rows.append(("LoRA checkpoint / base weights", f"base {full['base_bytes'] / 1e6:.0f} MB (goal <= 1%)",
                 100 * lora_figures["checkpoint_bytes"] / full["base_bytes"], "%"))
    # 2. val loss after the same wall time, from a small model trained here
    bench_lora_loss(cfg, device, rows, ways)


def bench_lora_loss(cfg, device, rows, ways):
    from data.loader import BatchLoader
    import sysconfig

    from model.checkpoint import load_checkpoint, model_from_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        base = cfg.lora_base
        if not base:
            base = os.path.join(scratch, "base")
            run_command([sys.executable, "train.py", "--max_iters=300", "--eval_interval=300", "--sample_tokens=0",
                         "--plot=false", f"--data_root={cfg.data_root}", f"--out_dir={base}", f"--device={device}"],
                        "LoRA base training")
        checkpoint = load_checkpoint(base)
        tuning = "pystdlib-tests"  # the standard library's own tests: code the base has not seen
        tokenizer_file = os.path.join(cfg.data_root, checkpoint["config"]["dataset"], "tokenizer.json")
        if not os.path.exists(os.path.join(cfg.data_root, tuning, "meta.json")):
            run_command([sys.executable, "data/prepare.py", tuning, f"--input={os.path.join(sysconfig.get_paths()['stdlib'], 'test')}",
                         "--tokenizer=bpe", f"--tokenizer_file={tokenizer_file}", "--max_bytes=4000000",
                         f"--data_root={cfg.data_root}"], "LoRA data preparation")
    block_size, batch_size = checkpoint["model_config"]["block_size"], 16
    val_loader = BatchLoader(os.path.join(cfg.data_root, tuning), "val", batch_size, block_size, 0, device=device)
    setting = f"{tuning}, {cfg.lora_seconds:.0f} s each"
    for way, name in ways.items():
        torch.manual_seed(0)
        model, _ = model_from_checkpoint(checkpoint, device=device)
        if way == "full":
            rows.append(("val loss of the base", tuning, validation_loss(model, val_loader), "nats"))
        optimizer = prepare_fine_tuning(model, way)
        # the same batches in the same order for both ways
        train_loader = BatchLoader(os.path.join(cfg.data_root, tuning), "train", batch_size, block_size, 0, device=device)
        steps, started = 0, time.perf_counter()
        while time.perf_counter() - started < cfg.lora_seconds:
            _, loss = model(*train_loader.next_batch())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
        rows.append((f"{name}: val loss", f"{setting} ({steps} steps)", validation_loss(model, val_loader), "nats"))


# nanoGPT's CPU recipe for Tiny Shakespeare, flag for flag (its README): the baseline.
RECIPE_BASELINE = ["--arch=gpt2", "--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=12",
                   "--dropout=0.0", "--learning_rate=1e-3", "--min_lr=1e-4", "--warmup_iters=100", "--beta2=0.99",
                   "--beta1=0.9", "--weight_decay=0.1", "--grad_clip=1.0", "--optimizer=adamw", "--lr_schedule=cosine",
                   "--tie_embeddings=true", "--mlp_activation=gelu", "--qk_norm=false", "--zero_init_proj=false",
                   "--logit_softcap=0"]
# Each change alone on top of the baseline; then the preset, which keeps what won.
RECIPE_CHANGES = {
    "baseline (nanoGPT CPU)": [],
    "+ Muon": ["--optimizer=muon"],
    "+ ReLU squared": ["--mlp_activation=relu2"],
    "+ QK-norm": ["--qk_norm=true"],
    "+ untied head": ["--tie_embeddings=false"],
    "+ zero-init projections": ["--zero_init_proj=true"],
    "+ logit soft-cap 30": ["--logit_softcap=30"],
    "+ warmup-stable-decay": ["--lr_schedule=wsd"],
    "+ batch 24": ["--batch_size=24"],
}
RECIPE_PRESET = "configs/shakespeare_char_cpu.toml"
RECIPE_TARGET = 1.90  # nanoGPT's CPU recipe ends near 1.88: the time to this loss compares speed


def recipe_run(cfg, device, flags, seed, max_iters, out_dir):
    """One training run in its own process; its evaluations from log.jsonl."""
    run_command([sys.executable, "train.py", RECIPE_PRESET, *flags, f"--dataset={cfg.recipe_dataset}",
                 f"--data_root={cfg.data_root}", f"--out_dir={out_dir}", f"--max_iters={max_iters}",
                 f"--lr_decay_iters={max_iters}", "--eval_interval=100", "--eval_iters=20", "--log_interval=10",
                 "--sample_tokens=0", "--plot=false", f"--device={device}", f"--seed={seed}"], "recipe training")
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def bench_recipe(cfg, device, rows):
    """Val loss after the same wall time, and the time to reach val 1.90, for the baseline,
    each change alone, and the preset. A short run first measures each variant's steps per
    second, so that its schedule (warm-up, decay) fits the budget exactly."""
    variants = dict(RECIPE_CHANGES, **{"preset (what is kept)": None})
    if cfg.recipe_variants:
        wanted = [name.strip() for name in cfg.recipe_variants.split(",")]
        variants = {name: flags for name, flags in variants.items() if name in wanted}
    for name, change in variants.items():
        flags = [] if change is None else RECIPE_BASELINE + change
        with tempfile.TemporaryDirectory() as scratch:
            records = recipe_run(cfg, device, flags, 0, 60, os.path.join(scratch, "calibrate"))
            speed = statistics.median(r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 20)
            tokens_per_step = records[-1]["tokens"] / records[-1]["step"]
            # evaluations take about 6% of a run at eval_interval=100
            max_iters = int(cfg.recipe_seconds * 0.94 * speed / tokens_per_step)
            finals, reached, elapsed = [], [], []
            for seed in range(cfg.recipe_seeds):
                evals = [r for r in recipe_run(cfg, device, flags, 1337 + seed, max_iters,
                                               os.path.join(scratch, f"seed{seed}")) if "val_loss" in r]
                finals.append(evals[-1]["val_loss"])
                elapsed.append(evals[-1]["elapsed_s"])
                reached += [next((r["elapsed_s"] for r in evals if r["val_loss"] <= RECIPE_TARGET), math.inf)]
        spread = f" (+-{statistics.stdev(finals):.3f} over {len(finals)} seeds)" if len(finals) > 1 else ""
        rows.append((f"recipe: {name}", f"val loss after {statistics.mean(elapsed):.0f} s, {max_iters} steps{spread}",
                     statistics.mean(finals), "nats"))
        rows.append((f"recipe: {name}", f"seconds to val {RECIPE_TARGET}", statistics.median(reached), "s"))


def bench_rag(cfg, rows):
    """Search time of the two indexes rag.py keeps, at 10^4 and 10^5 chunks, one question."""
    import numpy as np

    from data.dataset import stdlib_files
    from data.dataset import read_text_file
    from data.retrieval import BM25, chunk_document, dense_scores, top

    question = "Return the number of seconds since the epoch, as a floating point number."
    root, files = stdlib_files()
    chunks = []
    for path in files:
        text = read_text_file(path)
        chunks += [c["text"] for c in chunk_document(str(path), text, 200, 40)] if text else []
        if len(chunks) >= 100_000:
            break
    rng = np.random.default_rng(0)
    for n in (10_000, 100_000):
        embeddings = rng.standard_normal((n, 384), dtype=np.float32)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        query = embeddings[0].copy()
        seconds = median_time(lambda: top(dense_scores(embeddings, query), 5), max(cfg.repeats, 5))
        rows.append(("rag dense search (matrix x query, top 5)", f"{n:,} chunks x 384", seconds * 1000, "ms"))
        rows.append(("rag dense index memory", f"{n:,} chunks x 384 float32", embeddings.nbytes / 1e6, "MB"))
        texts = (chunks * (n // len(chunks) + 1))[:n]
        started = time.perf_counter()
        bm25 = BM25(texts)
        rows.append(("rag bm25 counting (on opening the index)", f"{n:,} chunks of 200 tokens",
                     time.perf_counter() - started, "s"))
        seconds = median_time(lambda: top(bm25.scores(question)[0], 5, only_positive=True), cfg.repeats)
        rows.append(("rag bm25 search (13-word question, top 5)", f"{n:,} chunks of 200 tokens", seconds * 1000, "ms"))


# ---- a real model against transformers and llama.cpp -------------------------------------------

BPB_WINDOW = 512  # tokens per scored window of the held-out text (each scored from its own start)


def real_inputs(cfg, directory):
    """The token ids every program gets (our tokenizer's, so all of them read exactly the same
    ids): a short prompt to generate from, a prompt_tokens-long prompt, and the held-out windows,
    with the bytes those windows' scored tokens stand for. Written to a JSON file for the probes."""
    import sysconfig

    from model.checkpoint import load_model

    path = cfg.text or os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --text={path}: {getattr(e, 'strerror', None) or e}") from None
    _, tokenizer, _ = load_model(cfg.model, None)
    ids = tokenizer.encode(text)
    if len(ids) < max(cfg.prompt_tokens, 2 * BPB_WINDOW):
        raise UserError(f"--text={path} has {len(ids)} tokens; the real section needs at least "
                        f"{max(cfg.prompt_tokens, 2 * BPB_WINDOW)}")
    scored = ids[:max(BPB_WINDOW, min(cfg.bpb_tokens, len(ids)) // BPB_WINDOW * BPB_WINDOW)]
    windows = [scored[i:i + BPB_WINDOW] for i in range(0, len(scored), BPB_WINDOW)]
    inputs = {"short_prompt": tokenizer.encode_prompt("The three most useful things to know about the sea are"),
              "long_prompt": ids[-cfg.prompt_tokens:],  # the text's end: not among the scored windows
              "windows": windows,
              "scored_bytes": sum(len(tokenizer.token_bytes(i)) for window in windows for i in window[1:]),
              "bpb_text": path}
    file = os.path.join(directory, "inputs.json")
    with open(file, "w") as f:
        json.dump(inputs, f)
    return file, inputs


def peak_memory_mb(field="VmHWM"):
    """This process's peak memory (VmHWM: getrusage can report a parent's), or with
    field="VmRSS" what it holds now."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_tokens(tokens):
    """(seconds to the first token, tokens/s after it) of an iterator of new tokens."""
    started = time.perf_counter()
    stamps = [time.perf_counter() for _ in tokens]
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return stamps[0] - started, rate


def weight_bytes_per_token(model):
    """Bytes of weights one new token reads: every weight matrix (int8 numbers and their scales, or
    float32) and bias once; norms, the embedding's one row and the KV cache are left out (a few KB).
    Times tokens/s, it is the memory speed generation runs at."""
    from model.quant import Int8Linear

    total = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):
            total += sum(t.numel() * t.element_size() for t in module.kernel_operands)
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        else:
            continue
        total += 0 if module.bias is None else module.bias.numel() * module.bias.element_size()
    return total


def real_figures(program, model, inputs_file, new_tokens, repeats, score=True):
    """Run in a process of its own (peak memory is per process): one program on the real model.
    program: "ours" | "ours q8_0" | "transformers" | "llama.cpp <file.gguf>". Prints JSON with
    tokens/s (the best of the repeats), time to first token of the long prompt (the best), peak
    memory, for ours the bytes of weights a token reads and how it runs, and (score) bits per byte."""
    with open(inputs_file) as f:
        inputs = json.load(f)
    short, long_prompt, windows = inputs["short_prompt"], inputs["long_prompt"], inputs["windows"]
    started = time.perf_counter()
    if program.startswith("ours"):
        from model.checkpoint import load_model

        ours, _, _ = load_model(model, None, quant="q8_0" if program.endswith("q8_0") else "")
        ours.eval()

        def generate(ids, count):
            return ours.generate(ids, count, temperature=0)

        def window_logits(window):
            with torch.no_grad():
                return ours(torch.tensor([window]))[0][0].float()
    elif program == "transformers":
        from transformers import AutoModelForCausalLM

        from model.hf import resolve_hf_folder

        if model.endswith(".gguf"):  # transformers reads (and dequantizes) a GGUF file itself
            theirs = AutoModelForCausalLM.from_pretrained(os.path.dirname(model) or ".", gguf_file=os.path.basename(model),
                                                          dtype=torch.float32)
        else:
            theirs = AutoModelForCausalLM.from_pretrained(resolve_hf_folder(model[len("hf:"):]), dtype=torch.float32)
        theirs.eval()

        def generate(ids, count):
            import queue
            import threading

            # transformers' streamer hook hands over each new token as it is made
            tokens, done = queue.Queue(), object()

            class Streamer:
                prompt_seen = False

                def put(self, value):
                    if self.prompt_seen:
                        tokens.put(int(value.reshape(-1)[0]))
                    self.prompt_seen = True

                def end(self):
                    tokens.put(done)

            def work():
                with torch.no_grad():
                    theirs.generate(torch.tensor([ids]), max_new_tokens=count, min_new_tokens=count, do_sample=False,
                                    streamer=Streamer(), pad_token_id=0)
            thread = threading.Thread(target=work)
            thread.start()
            while (token := tokens.get()) is not done:
                yield token
            thread.join()

        def window_logits(window):
            with torch.no_grad():
                return theirs(torch.tensor([window])).logits[0].float()
    else:
        import llama_cpp

        path = program.split(" ", 1)[1]
        threads = torch.get_num_threads()
        llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
                              verbose=False)

        def generate(ids, count):
            llm.reset()  # else it would reuse the cache of a prompt it has seen: no prefill to time
            for index, token in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True)):
                yield token
                if index + 1 == count:
                    return

        scorer = []

        def window_logits(window):
            if not scorer:  # a second instance that keeps every position's logits
                scorer.append(llama_cpp.Llama(model_path=path, n_ctx=BPB_WINDOW, n_batch=BPB_WINDOW, n_threads=threads,
                                              logits_all=True, verbose=False))
            scorer[0].reset()
            scorer[0].eval(window)
            return torch.from_numpy(scorer[0].scores[:len(window)].copy())
    load_seconds = time.perf_counter() - started
    timed_tokens(generate(short, 8))  # warm-up: allocations, caches
    rates = [timed_tokens(generate(short, new_tokens))[1] for _ in range(repeats)]
    firsts = [timed_tokens(generate(long_prompt, 1))[0] for _ in range(repeats)]
    peak, resident = peak_memory_mb(), peak_memory_mb("VmRSS")  # before scoring, which holds every position's logits
    figures = {"tokens_per_s": max(rates), "first_token_s": min(firsts), "peak_mb": peak, "resident_mb": resident,
               "load_s": load_seconds}
    if program.startswith("ours"):
        from model.kernels import generation_description

        figures["weight_bytes"] = weight_bytes_per_token(ours)
        figures["generation"] = generation_description(ours, "cpu")
    if score:
        nats = 0.0
        for window in windows:
            logits = window_logits(window)[:-1]
            nats += F.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
        figures["bits_per_byte"] = nats / math.log(2) / inputs["scored_bytes"]
    print(json.dumps(figures))


def bench_real(cfg, rows):
    if not cfg.model:
        print("real: no model given; pass --model=hf:<folder> or --model=<file>.gguf (and --gguf=<files> for "
              "llama.cpp), e.g. --model=hf:HuggingFaceTB/SmolLM2-135M-Instruct", file=sys.stderr)
        return
    programs = ["ours", "ours q8_0", "transformers"]
    gguf_files = [os.path.expanduser(p.strip()) for p in cfg.gguf.split(",") if p.strip()]
    if cfg.model.endswith(".gguf") and not gguf_files:
        gguf_files = [cfg.model]
    try:
        import llama_cpp  # noqa: F401  (not a requirement: see README.md)

        programs += [f"llama.cpp {path}" for path in gguf_files]
    except ImportError:
        if gguf_files:
            print("real: llama_cpp does not import, so llama.cpp is not measured (pip install llama-cpp-python)",
                  file=sys.stderr)
    with tempfile.TemporaryDirectory() as directory:
        inputs_file, inputs = real_inputs(cfg, directory)
        # The programs take turns, real_rounds times, and each speed figure is the best it reached:
        # a shared 2-core machine drifts by 15% over minutes, and one program measured in a slow
        # minute would otherwise move every ratio. Memory and bits per byte come from the first round.
        figures = {}
        for round_index in range(cfg.real_rounds):
            for program in programs:
                code = (f"import bench; bench.real_figures({program!r}, {cfg.model!r}, {inputs_file!r}, "
                        f"{cfg.real_tokens}, {cfg.repeats}, score={round_index == 0})")
                output = run_command([sys.executable, "-c", code], program).stdout.strip().splitlines()[-1]
                these = json.loads(output)
                if program not in figures:
                    figures[program] = these
                    continue
                best = figures[program]
                best["tokens_per_s"] = max(best["tokens_per_s"], these["tokens_per_s"])
                best["first_token_s"] = min(best["first_token_s"], these["first_token_s"])
    names = {"ours": "sample.py float32", "ours q8_0": "sample.py --quant=q8_0", "transformers": "transformers float32"}
    names.update({p: f"llama.cpp {os.path.basename(p.split(' ', 1)[1])}" for p in programs if p.startswith("llama.cpp")})
    for program in ("ours", "ours q8_0"):
        print(f"real: {names[program]} computes new tokens {figures[program]['generation']}", file=sys.stderr)
    model_name = os.path.basename(cfg.model.rstrip("/"))
    for program in programs:
        f = figures[program]
        rows.append((f"{model_name}: {names[program]}", f"greedy tokens/s, {cfg.real_tokens} new", f["tokens_per_s"], "tok/s"))
        rows.append((f"{model_name}: {names[program]}", f"first token of a {len(inputs['long_prompt'])}-token prompt",
                     f["first_token_s"], "s"))
        rows.append((f"{model_name}: {names[program]}", "peak memory (process, loading included)", f["peak_mb"], "MiB"))
        rows.append((f"{model_name}: {names[program]}", "memory held while generating", f["resident_mb"], "MiB"))
        rows.append((f"{model_name}: {names[program]}", f"bits per byte, {len(inputs['windows']) * BPB_WINDOW} tokens "
                     f"of {os.path.basename(inputs['bpb_text'])}", f["bits_per_byte"], "bpb"))
        if "weight_bytes" in f:
            rows.append((f"{model_name}: {names[program]}", "weights read per token", f["weight_bytes"] / 2**20, "MiB"))
            rows.append((f"{model_name}: {names[program]}", "memory speed: weights read per second",
                         f["weight_bytes"] * f["tokens_per_s"] / 1e9, "GB/s"))
    ours = figures["ours"]["tokens_per_s"]
    rows.append(("float32 here vs transformers", "tokens/s (goal >= 1.5)", ours / figures["transformers"]["tokens_per_s"], "x"))
    rows.append(("q8_0 here vs float32 here", "tokens/s (goal >= 2)", figures["ours q8_0"]["tokens_per_s"] / ours, "x"))
    # the most 8 bits could give if memory speed were all: the ratio of the bytes each token reads
    rows.append(("q8_0 here vs float32 here", "bytes of weights a token reads (inverse)",
                 figures["ours"]["weight_bytes"] / figures["ours q8_0"]["weight_bytes"], "x"))
    for program in programs:
        if program.startswith("llama.cpp"):
            rows.append((f"float32 here vs {names[program]}", "tokens/s", ours / figures[program]["tokens_per_s"], "x"))
            rows.append((f"q8_0 here vs {names[program]}", "tokens/s",
                         figures["ours q8_0"]["tokens_per_s"] / figures[program]["tokens_per_s"], "x"))


def machine_description(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()}"
    if device.startswith("cuda"):
        text += f", GPU {torch.cuda.get_device_name(device)}"
    return text + f"; device {device}"


def print_table(rows, machine):
    print(f"machine: {machine}")
    if not rows:
        return
    widths = [max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)]
    print(f"{'measurement':<{widths[0]}}  {'setting':<{widths[1]}}  {'value':>12}  unit")
    for what, setting, value, unit in rows:
        # (losses differ in the third decimal; other figures need no more than two)
        shown = f"{value:.3f}" if unit in ("nats", "bpb") else f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
        print(f"{what:<{widths[0]}}  {setting:<{widths[1]}}  {shown:>12}  {unit}")


def main():
    cfg = parse_config(BenchConfig, sys.argv[1:], USAGE)
    sections = [s.strip() for s in cfg.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise UserError(f"unknown section(s) {', '.join(sorted(unknown))}: use {', '.join(SECTIONS)}")
    if cfg.repeats < 1 or cfg.train_steps < 15 or cfg.new_tokens < 1:
        raise UserError("--repeats and --new_tokens must be at least 1, --train_steps at least 15")
    device = resolve_device(cfg.device)
    rows, results = [], {}
    if "train" in sections:
        bench_train(cfg, device, rows)
    if "generate" in sections or "runpy" in sections:
        bench_generate(cfg, device, rows, results)
    if "runpy" in sections:
        bench_runpy(cfg, rows, results)
    if "tokenizer" in sections:
        bench_bpe(cfg, rows)
    if "hf" in sections:
        bench_hf(cfg, device, rows)
    if "gguf" in sections:
        bench_gguf(cfg, rows)
    if "lora" in sections:
        bench_lora(cfg, device, rows)
    if "recipe" in sections:
        bench_recipe(cfg, device, rows)
    if "rag" in sections:
        bench_rag(cfg, rows)
    if "real" in sections:
        bench_real(cfg, rows)
    machine = machine_description(device)
    if cfg.json:
        print(json.dumps({"machine": machine, "config": dataclasses.asdict(cfg),
                          "figures": [dict(zip(("measurement", "setting", "value", "unit"), r)) for r in rows]},
                         indent=2))
    else:
        print_table(rows, machine)


if __name__ == "__main__":
    main_guard(main)
