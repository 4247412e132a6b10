"""Train a GPT.

    python train.py                                   # default: small model, Python stdlib corpus, CPU minutes
    python train.py configs/shakespeare_char.toml     # a preset
    python train.py --n_layer=4 --max_iters=500       # any field, see --help
    torchrun --nproc_per_node=8 train.py configs/gpt2_124m.toml   # many GPUs, same code

Everything the run does is in `train()`, top to bottom: set-up, data, model, optimizer,
then the loop (evaluate, learning rate, forward/backward, clip, step, log, checkpoint).
"""

import dataclasses
import json
import math
import os
import random
import shlex
import signal
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from model import lora
from model.checkpoint import (GPT2_SIZES, checkpoint_of, is_imported, load_checkpoint, load_model, lora_base_from_checkpoint,
                              model_from_checkpoint, save_checkpoint)
from model.cli import field, main_guard, parse_config, pick_dtype, resolve_device
from model.errors import UserError
from model.gpt import GPT, GPTConfig
from model.optimizer import make_optimizer
from model.chat import grow_vocabulary, with_chat_template
from model.tokenizer import load_tokenizer, tokenizer_from_dict

USAGE = "usage: python train.py [configs/NAME.toml] [--field=value ...]"
# the fields a checkpoint fixes: a trained model keeps its shape
MODEL_FIELDS = ("arch", "n_layer", "n_head", "n_embd", "block_size", "vocab_pad_multiple", "tie_embeddings",
                "mlp_activation", "qk_norm", "logit_softcap", "zero_init_proj")


@dataclass
class TrainConfig:
    # where things go
    out_dir: str = field("out", "folder for ckpt.pt, log.jsonl and loss.png")
    init_from: str = field("scratch", "scratch | resume (continue out_dir/ckpt.pt) | path/to/ckpt.pt (fine-tune from its weights) | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | hf:<folder or owner/name> | path/to/model.gguf")
    dataset: str = field("pystdlib", "prepared data set in data_root/<dataset>/ (built-in ones are prepared on first use)")
    data_root: str = field("data", "folder holding prepared data sets")
    # the model
    arch: str = field("gpt2", "gpt2 (GPT-2 exactly) | llama (RoPE, RMSNorm, SwiGLU, no biases)")
    n_layer: int = field(4, "transformer blocks")
    n_head: int = field(4, "attention heads per block")
    n_embd: int = field(128, "width of the residual stream")
    block_size: int = field(128, "context length in tokens")
    dropout: float = field(0.0, "dropout probability (0 for pre-training big data, ~0.2 for small data)")
    # LoRA: train small adapters beside a frozen base instead of every weight
    lora_rank: int = field(0, "LoRA rank r of the adapters (0 = off: train every weight)")
    lora_alpha: float = field(0.0, "LoRA scale: the adapter adds (alpha / r) B A x (0 = twice the rank)")
    lora_dropout: float = field(0.0, "dropout on the adapters' input")
    lora_targets: str = field(lora.DEFAULT_TARGETS, "layers to adapt, comma-separated: q, k, v, attn.c_proj, "
                              "mlp.c_fc, mlp.c_gate (llama), mlp.c_proj; or all")
    vocab_pad_multiple: int = field(64, "pad the embedding rows to a multiple of this (fast GPU matmuls; never sampled)")
    tie_embeddings: bool = field(True, "the output layer is the token embedding (false: a matrix of its own)")
    mlp_activation: str = field("", "'' (the arch's: gelu for gpt2, swiglu for llama) | relu2 (ReLU squared)")
    qk_norm: bool = field(False, "RMS-normalise queries and keys before attention")
    logit_softcap: float = field(0.0, "> 0: squash the logits into (-softcap, softcap) with tanh")
    zero_init_proj: bool = field(False, "initialise the residual projections (c_proj) at zero")
    # the optimisation
    optimizer: str = field("adamw", "adamw | muon (Muon for the blocks' weight matrices, AdamW for the rest)")
    batch_size: int = field(32, "sequences per micro-batch (per process)")
    grad_accum: int = field(1, "micro-batches summed before each optimizer step")
    max_iters: int = field(1000, "optimizer steps to train for")
    learning_rate: float = field(2e-3, "peak learning rate (after warm-up)")
    min_lr: float = field(2e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = field(50, "steps of linear warm-up from 0 to learning_rate")
    lr_decay_iters: int = field(0, "step where the decay reaches min_lr (0 = max_iters)")
    lr_schedule: str = field("cosine", "cosine | wsd (warm-up, stable at learning_rate, then a linear decay)")
    decay_fraction: float = field(0.3, "--lr_schedule=wsd: share of the steps spent decaying to min_lr")
    weight_decay: float = field(0.1, "AdamW weight decay, on 2-D weights only")
    beta1: float = field(0.9, "AdamW beta1")
    beta2: float = field(0.99, "AdamW beta2")
    grad_clip: float = field(1.0, "clip the gradient norm to this (0 = off)")
    muon_learning_rate: float = field(0.02, "--optimizer=muon: peak learning rate of the Muon matrices (same schedule)")
    muon_momentum: float = field(0.95, "--optimizer=muon: momentum of the Muon matrices")
    # watching it
    eval_interval: int = field(250, "evaluate train/val loss every this many steps")
    eval_iters: int = field(20, "batches per evaluation")
    log_interval: int = field(10, "update the progress bar and log.jsonl every this many steps")
    checkpoint_interval: int = field(0, "also write ckpt.pt every this many steps (0 = at evaluations and the end)")
    sample_tokens: int = field(300, "tokens to sample from the model at the end (0 = none)")
    sample_prompt: str = field("\n", "prompt for the sample at the end")
    # the machine
    device: str = field("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = field("auto", "auto (bfloat16 on CUDA, else float32) | float32 | bfloat16 | float16")
    compile: bool = field(False, "torch.compile the model (faster on GPU; slow to start)")
    seed: int = field(1337, "seed for initialisation, dropout and the batch order")
    plot: bool = field(True, "redraw out_dir/loss.png at evaluations, at most every 30 s and at the end (needs matplotlib)")


def learning_rate_at(step, cfg):
    """Linear warm-up, then a cosine from learning_rate down to min_lr, then flat. Or (wsd:
    warmup-stable-decay, the trapezoid) warm-up, learning_rate held, and a straight line down
    to min_lr over the last decay_fraction of the steps: the high plateau makes the most
    progress, and the final descent collects it (the loss drops fast once the rate falls)."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    if step >= decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        decay_start = decay_iters - cfg.decay_fraction * decay_iters
        if step < decay_start:
            return cfg.learning_rate
        return cfg.learning_rate + (step - decay_start) / (decay_iters - decay_start) * (cfg.min_lr - cfg.learning_rate)
    progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def prepare_command(cfg, meta):
    """The data/prepare.py command that tokenizes the data set's text with the tokenizer of the
    model that cfg.init_from names (a model trained here, or one imported from Hugging Face)."""
    if cfg.init_from == "resume":
        model_tokenizer = cfg.out_dir
    elif cfg.init_from in GPT2_SIZES:
        model_tokenizer = f"hf:{cfg.init_from}"
    else:  # hf:<folder or owner/name>, a .gguf file, or the path of a checkpoint
        model_tokenizer = cfg.init_from
    source = meta.get("source", "SOURCE")
    if source.startswith("python stdlib"):  # how prepare.py describes the pystdlib corpus
        source = "python:stdlib"
    words = ["python", "data/prepare.py", cfg.dataset, f"--input={source}", f"--tokenizer={model_tokenizer}"]
    if cfg.data_root != "data":
        words.append(f"--data_root={cfg.data_root}")
    return " ".join(shlex.quote(word) for word in words)


def ensure_dataset(cfg, is_master):
    """The prepared data folder; built-in data sets are prepared the first time they are used."""
    data_dir = os.path.join(cfg.data_root, cfg.dataset)
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        from data.dataset import BUILTINS, prepare

        if cfg.dataset not in BUILTINS:
            raise UserError(f"no prepared data set at {data_dir}: run python data/prepare.py {cfg.dataset} --input=...")
        if is_master:
            print(f"preparing the {cfg.dataset} data set (first use)...", file=sys.stderr)
            prepare(cfg.dataset, data_root=cfg.data_root)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # other ranks wait for rank 0 to finish writing
    with open(os.path.join(data_dir, "meta.json")) as f:
        return data_dir, json.load(f)


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for model FLOPs utilisation.
GPU_PEAK_BF16_FLOPS = {"H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
                       "A100": 312e12, "A10G": 70e12, "L40S": 362e12, "L4": 121e12}


def gpu_peak_flops(device):
    """(name, peak FLOP/s) of this GPU when it is one we know, else (name, None)."""
    if not device.startswith("cuda"):
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_BF16_FLOPS.items():  # most specific names first
        if key in name:
            return name, flops
    return name, None


def peak_memory_mb(device):
    """Most memory this process has held: GPU memory on CUDA, resident RAM otherwise."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def unigram_entropy(data_dir, meta, max_tokens=50_000_000):
    """Entropy (nats/token) of the token frequencies: the loss of a model that ignores context."""
    tokens = np.memmap(os.path.join(data_dir, "train.bin"), dtype=meta["dtype"], mode="r")[:max_tokens]
    counts = np.bincount(tokens, minlength=meta["vocab_size"]).astype(np.float64)
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * np.log(probs)).sum())


def rng_state(device_type):
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if device_type == "cuda" else []}


def restore_rng_state(state, device_type):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if device_type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(model, loaders, eval_iters, autocast, world_size):
    """Mean loss over the same eval_iters batches of each split (averaged over all processes)."""
    model.eval()
    losses = {}
    for split, loader in loaders.items():
        total = torch.zeros((), device=loader.device)
        for i in range(eval_iters):
            x, y = loader.eval_batch(i)
            with autocast:
                _, loss = model(x, y)
            total += loss.float()
        if world_size > 1:
            torch.distributed.all_reduce(total)
        losses[split] = total.item() / eval_iters / world_size
    model.train()
    return losses


def train(cfg, checkpoint=None):
    """Train from scratch, or from `checkpoint` (resume when cfg.init_from == "resume")."""
    # ---- processes and devices -------------------------------------------------------
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # started by torchrun: one process per GPU (or per CPU worker)
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(cfg.device)
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        # DDP imports torch._dynamo; imported for the first time while a process group exists,
        # it keeps references to the group, and destroy_process_group cannot end a group that
        # something still holds (see leave_together): import it before the group is made
        import torch._dynamo as _dynamo  # noqa: F401  (`as`: a bare import would make torch a local name)
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        signal.signal(signal.SIGTERM, stopped_by_launcher)
    else:
        rank, world_size, device = 0, 1, resolve_device(cfg.device)
    is_master = rank == 0  # only rank 0 prints, plots and writes files
    device_type = device.split(":")[0]
    dtype = pick_dtype(cfg.dtype, device_type)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: ~free speed for fp32 parts
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    say = (lambda *a: print(*a, file=sys.stderr)) if is_master else (lambda *a: None)

    resumed = checkpoint is not None and cfg.init_from == "resume"
    if is_master:
        os.makedirs(cfg.out_dir, exist_ok=True)

    # ---- data ----------------------------------------------------------------------------
    from data.loader import BatchLoader

    data_dir, meta = ensure_dataset(cfg, is_master)
    tokenizer = load_tokenizer(os.path.join(data_dir, "tokenizer.json"))
    # a model without a chat template learns the default one: its markers are new ids (model/chat.py)
    new_chat_markers = (checkpoint is not None and not resumed and checkpoint["tokenizer"] != tokenizer.to_dict()
                        and with_chat_template(tokenizer_from_dict(checkpoint["tokenizer"])).to_dict() == tokenizer.to_dict())
    if new_chat_markers and cfg.lora_rank:
        raise UserError("this model has no chat template, so the chat data set gives it new marker tokens whose "
                        "embedding rows must be trained: fine-tune all weights (--lora_rank=0)")
    if checkpoint is not None and checkpoint["tokenizer"] != tokenizer.to_dict() and not new_chat_markers:
        raise UserError(f"data set {cfg.dataset!r} was prepared with another tokenizer ({meta['tokenizer']}, "
                        f"{meta['vocab_size']:,} ids) than the model's; prepare it with the model's: "
                        f"{prepare_command(cfg, meta)}")
    loaders = {split: BatchLoader(data_dir, split, cfg.batch_size, cfg.block_size, cfg.seed, rank=rank,
                                  world_size=world_size, grad_accum=cfg.grad_accum, device=device)
               for split in ("train", "val")}
    train_loader = loaders["train"]

    # ---- model -----------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    lora_settings = None
    if cfg.lora_rank:
        if resumed:  # the base named in the adapter's checkpoint, checked against its hash
            model, _ = lora_base_from_checkpoint(checkpoint, dropout=cfg.dropout)
            lora_settings = checkpoint["lora"]
        else:
            model, _ = model_from_checkpoint(checkpoint, device="cpu", dropout=cfg.dropout)
            lora_settings = {"base": lora_base_reference(cfg.init_from), "base_sha256": lora.weights_sha256(model)}
        targets = lora.parse_targets(cfg.lora_targets, model.config.arch)
        lora_settings = {**lora_settings, "rank": cfg.lora_rank, "alpha": lora_alpha(cfg),
                         "dropout": cfg.lora_dropout, "targets": targets,
                         "base_parameters": lora_settings.get("base_parameters", model.num_params())}
        lora.add_lora(model, cfg.lora_rank, lora_alpha(cfg), cfg.lora_dropout, targets)
        if resumed:
            lora.load_adapter_state_dict(model, checkpoint["model"])
    elif checkpoint is not None:
        model, _ = model_from_checkpoint(checkpoint, device="cpu", dropout=cfg.dropout)
        if new_chat_markers:
            grow_vocabulary(model, tokenizer.vocab_size)
    else:
        model = GPT(GPTConfig(vocab_size=meta["vocab_size"], dropout=cfg.dropout,
                              **{name: getattr(cfg, name) for name in MODEL_FIELDS}))
    model.to(device)
    raw_model = model  # the plain module: what we save, so checkpoints never depend on compile/DDP
    if cfg.compile:
        if sys.platform == "win32":
            raise UserError("--compile is not supported on Windows by torch.compile; run without it")
        model = torch.compile(model)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device_type == "cuda" else None)
    optimizer = make_optimizer(raw_model, device_type, cfg.optimizer, cfg.learning_rate, cfg.weight_decay,
                               (cfg.beta1, cfg.beta2), cfg.muon_momentum)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)

    step, best_val_loss, last_eval_step = 0, float("inf"), -1
    if resumed:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        step, best_val_loss = checkpoint["step"], checkpoint["best_val_loss"]
        last_eval_step = checkpoint["last_eval_step"]
        train_loader.load_state_dict(checkpoint["loader"])
        restore_rng_state(checkpoint["rng"], device_type)
    start_step = step

    # ---- what this run is, in numbers -------------------------------------------------
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * world_size
    vocab = meta["vocab_size"]
    say(json.dumps(dataclasses.asdict(cfg)))
    say(f"model: {raw_model.config.arch}, {raw_model.num_params():,} parameters "
        f"({raw_model.config.n_layer} layers, {raw_model.config.n_head} heads, {raw_model.config.n_embd} wide, "
        f"context {raw_model.config.block_size})")
    if lora_settings:
        say(lora.trainable_summary(raw_model, cfg.lora_rank, lora_settings["targets"]))
    say(f"data: {cfg.dataset}, {meta['train_tokens']:,} train tokens, {meta['tokenizer']} tokenizer, vocabulary {vocab}")
    chat_data = bool(meta.get("mask"))
    if new_chat_markers:
        say(f"chat: the model has no chat template; the default one's markers are {vocab - checkpoint_vocab(checkpoint)} "
            "new embedding rows, trained from the mean of the others")
    if chat_data:  # the loss (and the val loss) is the mean over the assistant's tokens only
        say(f"chat data: {meta['train_conversations']:,} conversations, the loss taken on their "
            f"{meta['train_trained_tokens']:,} assistant tokens only; windows of {cfg.block_size} start at "
            f"conversation starts (packed)"
            + (f"; {train_loader.unreachable:,} assistant tokens lie further than that from their conversation's "
               f"start and are never trained (a larger --block_size reaches them)" if train_loader.unreachable else ""))
    say(f"device: {device} {str(dtype).replace('torch.', '')}, {world_size} process(es), "
        f"{tokens_per_step:,} tokens per step")
    say(f"reference points: uniform guess ln({vocab}) = {math.log(vocab):.3f} nats; "
        f"unigram entropy of the data = {unigram_entropy(data_dir, meta):.3f} nats/token")
    # bits per byte of the text that is scored: for chat data, the replies' bytes per reply token
    bytes_per_token = (meta["val_trained_bytes"] / meta["val_trained_tokens"] if chat_data
                       else meta["val_bytes"] / meta["val_tokens"])
    val_name = "val loss (assistant tokens)" if chat_data else "val loss"
    gpu_name, peak_flops = gpu_peak_flops(device)
    flops_per_token = raw_model.flops_per_token(cfg.block_size)
    if peak_flops:
        say(f"MFU is measured against {gpu_name}'s dense bf16 peak of {peak_flops / 1e12:.0f} TFLOP/s "
            f"({flops_per_token / 1e6:.0f} MFLOP per token)")

    log_file = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if is_master else None

    def log(record):
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def checkpoint_now():
        # a LoRA run saves its adapter and the base's name and hash; the base's file is never written
        weights = lora.adapter_state_dict(raw_model) if lora_settings else raw_model.state_dict()
        return {"model": weights, **({"lora": lora_settings} if lora_settings else {}),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "model_config": dataclasses.asdict(raw_model.config),
                "config": dataclasses.asdict(cfg), "step": step, "best_val_loss": best_val_loss,
                "last_eval_step": last_eval_step,
                "rng": rng_state(device_type), "loader": train_loader.state_dict(),
                "tokenizer": tokenizer.to_dict()}

    nonfinite_seen = torch.zeros((), dtype=torch.bool, device=device)  # checked without a sync per step

    def diverged(detail=""):
        """The one message for a loss that stopped being a number: nothing is saved over the last good checkpoint."""
        progress.close()
        return UserError(f"loss became NaN/inf by step {step}{detail}; stopped without saving, the last good "
                         f"checkpoint in {cfg.out_dir} is kept. Try a lower --learning_rate or --grad_clip")

    def save():
        nonfinite = nonfinite_seen.float()
        if distributed:  # each process sees the loss of its own batches: a NaN in any stops them all
            torch.distributed.all_reduce(nonfinite, op=torch.distributed.ReduceOp.MAX)
        if nonfinite.item():
            raise diverged()
        if is_master:
            path = os.path.join(cfg.out_dir, "ckpt.pt")
            try:
                save_checkpoint(checkpoint_now(), path)
            except OSError as e:  # a full disk, a folder in the way: the last checkpoint written is kept
                progress.close()
                raise UserError(f"cannot write the checkpoint {path}: {e.strerror or e}") from None

    # Ctrl-C: finish the current step, save, and exit (a second Ctrl-C stops at once)
    stop_requested = []

    def request_stop(signum, frame):
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested.append(signum)
        say("\nstopping after this step (Ctrl-C again to quit without saving)...")

    signal.signal(signal.SIGINT, request_stop)

    # ---- the loop -------------------------------------------------------------------------
    from tqdm import tqdm

    progress = tqdm(total=cfg.max_iters, initial=step, disable=not is_master, dynamic_ncols=True, unit="step")
    timer, tokens_since = time.time(), 0
    run_started = plotted_at = time.time()  # (no picture of the step-0 loss alone)
    while True:
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            if step != last_eval_step:  # (a resumed run may have been evaluated at this step already)
                losses = evaluate(model, loaders, cfg.eval_iters, autocast, world_size)
                if not all(math.isfinite(v) for v in losses.values()):
                    raise diverged(f" (val loss {losses['val']})")
                val_bpb = losses["val"] / math.log(2) / bytes_per_token
                best_val_loss, last_eval_step = min(best_val_loss, losses["val"]), step
                if is_master:
                    progress.write(f"step {step}: train loss {losses['train']:.4f}, {val_name} {losses['val']:.4f}, "
                                   f"val bpb {val_bpb:.4f}", file=sys.stderr)
                log({"step": step, "tokens": step * tokens_per_step, "train_loss": losses["train"],
                     "val_loss": losses["val"], "val_bpb": val_bpb, "lr": learning_rate_at(step, cfg),
                     "elapsed_s": round(time.time() - run_started, 2)})
                # Drawing costs a fraction of a second (more for the first, which imports
                # matplotlib): at most every 30 s, and always at the end, keeps short runs fast.
                if is_master and cfg.plot and (time.time() - plotted_at > 30 or step == cfg.max_iters):
                    draw_loss_plot(cfg.out_dir)
                    plotted_at = time.time()
                if step > start_step or step == cfg.max_iters:
                    save()
            timer, tokens_since = time.time(), 0  # evaluation time is not training time
        if step >= cfg.max_iters:
            break

        lr = learning_rate_at(step, cfg)
        for group in optimizer.param_groups:  # Muon's matrices follow the same schedule from their own peak
            group["lr"] = lr * (cfg.muon_learning_rate / cfg.learning_rate if group.get("use_muon") else 1.0)
        step_loss = torch.zeros((), device=device)  # mean over micro-batches, summed on the device: no sync
        for micro_step in range(cfg.grad_accum):
            x, y = train_loader.next_batch()
            # under DDP, all-reduce the gradients only after the last micro-batch
            last = micro_step == cfg.grad_accum - 1
            sync = nullcontext() if (not distributed or last) else model.no_sync()
            with sync:
                with autocast:
                    _, loss = model(x, y)
                scaler.scale(loss / cfg.grad_accum).backward()
            step_loss += loss.detach().float() / cfg.grad_accum
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        nonfinite_seen |= ~torch.isfinite(step_loss)
        step += 1
        tokens_since += tokens_per_step
        progress.update(1)

        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            loss_value = step_loss
            if distributed:
                torch.distributed.all_reduce(loss_value)
                loss_value /= world_size
            loss_value = loss_value.item()  # the one host sync per log interval
            if not math.isfinite(loss_value):
                raise diverged(f" (training loss {loss_value})")
            tokens_per_s = tokens_since / max(time.time() - timer, 1e-9)
            timer, tokens_since = time.time(), 0
            record = {"step": step, "tokens": step * tokens_per_step, "loss": loss_value, "lr": lr,
                      "tokens_per_s": tokens_per_s, "peak_memory_mb": round(peak_memory_mb(device), 1)}
            if peak_flops:  # model FLOPs utilisation: how much of the GPU's peak the model's math uses
                record["mfu"] = tokens_per_s * flops_per_token / (peak_flops * world_size)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                                 **({"mfu": f"{record['mfu']:.1%}"} if peak_flops else {}))
            log(record)
        if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0:
            save()
        if stop_agreed(stop_requested, distributed, step % cfg.log_interval == 0, device):
            save()
            progress.close()
            say(f"stopped at step {step}; saved {cfg.out_dir}/ckpt.pt (continue with --init_from=resume)")
            if distributed:
                del model  # the DDP wrapper holds the process group
                leave_together(device)
            sys.exit(130)
    progress.close()
    say(f"done: {step} steps, best val loss {best_val_loss:.4f}; saved {cfg.out_dir}/ckpt.pt")
    if distributed:  # the last collective operation is behind every process: end the group, then sample
        del model  # the DDP wrapper holds the process group
        leave_together(device)
    if is_master and lora_settings:
        say(lora_size_line(os.path.join(cfg.out_dir, "ckpt.pt"), lora_settings))

    if is_master and cfg.sample_tokens > 0:
        raw_model.eval()
        prompt = tokenizer.encode(cfg.sample_prompt)
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
        new = list(raw_model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=50,
                                      eos_id=tokenizer.eos_id, generator=generator))
        say("---- a sample from the model (python sample.py for more) ----")
        print(tokenizer.decode(prompt + new))
    if log_file:
        log_file.close()


def checkpoint_vocab(checkpoint):
    return GPTConfig(**checkpoint["model_config"]).vocab_size


def lora_alpha(cfg):
    return cfg.lora_alpha or 2.0 * cfg.lora_rank


def lora_base_reference(init_from):
    """How a LoRA run names its base: a checkpoint by its absolute path (so sample.py finds it
    from any folder), a hub model by its name."""
    if os.path.exists(init_from):
        path = os.path.abspath(init_from)
        return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    return init_from


def lora_size_line(path, settings):
    adapter_bytes = os.path.getsize(path)
    base = settings["base"]
    if os.path.isfile(base):
        base_bytes, what = os.path.getsize(base), f"the base's checkpoint {base}"
    else:  # a hub model: its weights in float32
        base_bytes, what = 4 * settings["base_parameters"], f"the base {base} in float32"
    return (f"adapter checkpoint {path}: {adapter_bytes / 1e6:.2f} MB (weights, optimizer state and run state), "
            f"{adapter_bytes / base_bytes:.2%} of {what} ({base_bytes / 1e6:.2f} MB)")


def stop_agreed(stop_requested, distributed, at_log_step, device):
    """Single process: stop when Ctrl-C was pressed. Under DDP every rank must stop at the
    same step, so the ranks agree (one all-reduce) at log steps only."""
    if not distributed:
        return bool(stop_requested)
    if not at_log_step:
        return False
    flag = torch.tensor(float(bool(stop_requested)), device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() > 0


# ---- how a process of a torchrun run ends ------------------------------------------------
# Together, when every process reaches the same end at the same step (finished, or Ctrl-C
# agreed at a log step), or alone, when one stops on its own (an error, a failed collective
# operation, the launcher's SIGTERM) and the others may still be inside a collective.

def leave_together(device):
    """Barrier, then destroy the process group. gloo runs each collective on a worker thread
    that lets go of the collective's tensors only after the caller has its result. A process
    that ended right after its last all-reduce (rank 1, while rank 0 still writes the
    checkpoint) could reach interpreter shutdown with that thread still holding a tensor;
    releasing it needs an interpreter that is going away, and the C++ runtime aborts
    ("terminate called without an active exception", SIGABRT: torchrun reports a failed run).
    destroy_process_group joins the worker threads only when nothing else holds the group
    (hence `del model` before this, and torch._dynamo imported before the group is made).
    The barrier keeps any process from ending its group while another is still inside a
    collective operation (NCCL's teardown must not meet a collective in flight)."""
    torch.distributed.barrier(device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None)
    torch.distributed.destroy_process_group()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # no group left to leave a note in


# the store key where the first process to stop says why (one per attempt: torchrun can restart a run)
STOP_NOTE = f"train.py/stopped/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def leave_alone(exit_code, line):
    """End this process now: leave a note in the group's store for the others, print one line,
    and exit without the interpreter's shutdown. Waiting for the others (a barrier) would hang,
    and destroying the group or shutting the interpreter down while a collective may be in
    flight is what aborts (see leave_together). torchrun sees the exit and stops the others
    with SIGTERM; under gloo their collective operations fail at once anyway, when this
    process's connections close. (A process blocked inside an NCCL collective runs no Python
    until it returns: torchrun kills it after its --shutdown-timeout, 30 s by default.)"""
    try:  # compare_set writes a missing key only: the first process to stop keeps its note
        store = torch.distributed.distributed_c10d._get_default_store()
        store.compare_set(STOP_NOTE, "", f"process {torch.distributed.get_rank()} stopped ({line})")
    except Exception:  # the store went down with its host: the line below still says why
        pass
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    os._exit(exit_code)


def other_process_stopped():
    """The note of the first process of this run that stopped on its own, or None."""
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        if store.check([STOP_NOTE]):
            note = store.get(STOP_NOTE).decode()
            if not note.startswith(f"process {torch.distributed.get_rank()} "):
                return note
    except Exception:
        pass
    return None


def stop_line(error):
    """(exit code, one line) for an exception that ends one process of a torchrun run."""
    if isinstance(error, UserError):
        return 2, f"error: {error}"
    if isinstance(error, KeyboardInterrupt):
        return 130, "interrupted"
    note = other_process_stopped()
    if note:  # this process's collective failed because another process had stopped
        return 1, f"stopped: {note}, so process {torch.distributed.get_rank()} stops too"
    traceback.print_exception(error)  # a failure of this process's own: where it happened matters
    return 1, f"error: process {torch.distributed.get_rank()} failed ({type(error).__name__})"


def stopped_by_launcher(signum, frame):
    """torchrun stops every process with SIGTERM when one of them has ended with an error."""
    note = other_process_stopped() or "the launcher stopped the run"
    leave_alone(128 + signum, f"stopped: {note}, so process {torch.distributed.get_rank()} stops too")


def draw_loss_plot(out_dir):
    """Redraw loss.png from log.jsonl (skipped, with one note, when matplotlib is missing)."""
    from model.loss_plot import plot_log  # matplotlib is imported only when drawing

    try:
        plot_log(os.path.join(out_dir, "log.jsonl"), os.path.join(out_dir, "loss.png"))
    except Exception as e:  # a picture is never worth stopping a training run for
        print(f"note: could not draw {out_dir}/loss.png ({e})", file=sys.stderr)


DEFAULT_PRESET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.toml")


def main():
    argv = sys.argv[1:]
    from_checkpoint = any(a.startswith("--init_from=") and a != "--init_from=scratch" for a in argv)
    if not from_checkpoint and not any(not a.startswith("--") for a in argv):
        argv = [DEFAULT_PRESET, *argv]  # no preset named: the default run's
    cfg, given = parse_config(TrainConfig, argv, USAGE, allow_preset=True, return_given=True)
    checkpoint = None
    if cfg.init_from != "scratch":
        resume = cfg.init_from == "resume"
        imported = is_imported(cfg.init_from)
        if imported:
            checkpoint = imported_checkpoint(cfg.init_from)
        else:
            checkpoint = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt") if resume else cfg.init_from)
        if resume:
            check_lora_resume(checkpoint, cfg, given)
        # the model's shape comes from the checkpoint; asking for another one is a mistake
        # (fields a checkpoint predates have their defaults: GPTConfig fills them in)
        saved_model = dataclasses.asdict(GPTConfig(**checkpoint["model_config"]))
        fixed = [name for name in MODEL_FIELDS if not (imported and name == "block_size")]
        for name in fixed:
            if name in given and getattr(cfg, name) != saved_model[name]:
                raise UserError(f"cannot change {name} of a trained model (the checkpoint has {saved_model[name]})")
        saved_optimizer = checkpoint["config"].get("optimizer", "adamw")
        if resume and "optimizer" in given and cfg.optimizer != saved_optimizer:
            raise UserError(f"cannot resume a run that used --optimizer={saved_optimizer} with --optimizer={cfg.optimizer}; "
                            "start a new run from its weights with --init_from=PATH/ckpt.pt instead")
        base = dataclasses.asdict(cfg)
        if resume:  # continue with the saved settings; only what was given now changes
            base.update({k: v for k, v in checkpoint["config"].items() if k in base})
            base.update({k: getattr(cfg, k) for k in given})
        # a resumed run keeps its own sequence length, which can be shorter than its model's
        # context (a fine-tuned imported model)
        base.update({name: saved_model[name] for name in fixed if not (resume and name == "block_size")})
        if imported:
            # a real model's context can be 131,072 tokens; fine-tuning trains on shorter
            # sequences (--block_size, at most the model's own) and the model keeps its context
            if "block_size" not in given:
                base["block_size"] = min(saved_model["block_size"], 1024)
            if base["block_size"] > saved_model["block_size"]:
                raise UserError(f"--block_size can be at most the model's context, {saved_model['block_size']}")
        cfg = TrainConfig(**base)
    check_config(cfg)
    try:
        train(cfg, checkpoint)
    except (Exception, KeyboardInterrupt) as e:
        if torch.distributed.is_initialized():  # this process stops while the others may not
            leave_alone(*stop_line(e))
        raise


LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def check_lora_resume(checkpoint, cfg, given):
    """A resumed run keeps its kind: a LoRA run continues its adapter, a full run stays full."""
    if "lora" not in checkpoint:
        flags = [f"--{name}" for name in LORA_FIELDS if name in given]
        if flags:
            raise UserError(f"{', '.join(flags)} given to resume a run that is not a LoRA run; to train an adapter "
                            "on its model, start a new run: --init_from=path/to/ckpt.pt --out_dir=NEW --lora_rank=8")
        return
    saved = checkpoint["config"]
    for name in ("lora_rank", "lora_alpha", "lora_targets"):
        if name in given and getattr(cfg, name) != saved[name]:
            raise UserError(f"cannot change --{name} of a LoRA run when resuming (the checkpoint has {saved[name]})")


def imported_checkpoint(init_from):
    """A GPT-2, Hugging Face or GGUF model as the start of a new run: a checkpoint at step 0 holding
    its weights, shape and tokenizer, so training treats it like any checkpoint it fine-tunes."""
    return checkpoint_of(*load_model(init_from, out_dir=None)[:2])


def check_config(cfg):
    positive = ["n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_interval",
                "eval_iters", "log_interval", "vocab_pad_multiple"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if cfg.max_iters < 0:
        raise UserError("--max_iters must be 0 or more")
    try:  # the model's own rules (arch, head sizes), checked before any data is read
        GPTConfig(**{name: getattr(cfg, name) for name in MODEL_FIELDS})
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.lr_schedule not in ("cosine", "wsd") or not 0.0 < cfg.decay_fraction <= 1.0:
        raise UserError("--lr_schedule must be cosine or wsd, and --decay_fraction in (0, 1]")
    if cfg.optimizer not in ("adamw", "muon"):
        raise UserError(f"unknown --optimizer={cfg.optimizer}: use adamw or muon")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.lora_rank < 0:
        raise UserError(f"--lora_rank must be 0 (off) or more, got {cfg.lora_rank}")
    if cfg.lora_alpha < 0 or not 0.0 <= cfg.lora_dropout < 1.0:
        raise UserError("--lora_alpha must be 0 (twice the rank) or more and --lora_dropout in [0, 1)")
    if cfg.lora_rank:
        if cfg.init_from == "scratch":
            raise UserError("LoRA adapts a trained model: give its base with --init_from=path/to/ckpt.pt "
                            "(or gpt2, hf:..., a .gguf file), or leave --lora_rank at 0 to train from scratch")
        lora.parse_targets(cfg.lora_targets, cfg.arch)


if __name__ == "__main__":
    main_guard(main)
