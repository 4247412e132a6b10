"""Checkpoints: one file holding everything needed to sample from, or resume, a run.

Written atomically (model/files.py: a temporary file, then os.replace) so a crash mid-write never leaves a
half-written ckpt.pt, and read with torch.load(weights_only=True), which refuses to run
code hidden in a file (plain pickles can).
"""

import dataclasses
import os

import torch

from model.errors import UserError
from model.files import atomic_write
from model import lora
from model.gpt import GPT, GPTConfig
from model.hf import GPT2_SIZES
from model.quant import quantize_model
from model.tokenizer import tokenizer_from_dict

REQUIRED_KEYS = ("model", "model_config", "tokenizer", "config", "step")
# Parameter names that changed: checkpoints written before the change still load.
RENAMED_PARAMETERS = {".mlp.w1.": ".mlp.c_gate.", ".mlp.w3.": ".mlp.c_fc."}


def upgrade_state_dict(state):
    """A checkpoint's weights under today's parameter names."""
    renamed = {}
    for name, tensor in state.items():
        for old, new in RENAMED_PARAMETERS.items():
            name = name.replace(old, new)
        renamed[name] = tensor
    return renamed


def save_checkpoint(checkpoint, path):
    with atomic_write(path) as f:
        torch.save(checkpoint, f)


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint's dict, or a UserError that says what is wrong with the file."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path} (train one first: python train.py)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged file, with pages of advice
        # torch's own message is long and written for code authors; the type is enough to search for
        raise UserError(f"{path} is not a readable checkpoint: it is damaged or is not a torch checkpoint "
                        f"({type(e).__name__})") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in REQUIRED_KEYS):
        raise UserError(f"{path} is not a checkpoint of this project (missing model, config or tokenizer)")
    return checkpoint


def model_from_checkpoint(checkpoint, device="cpu", dropout=None):
    """Rebuild the GPT and its tokenizer from a checkpoint dict. A LoRA run's checkpoint holds
    only the adapter: its base is loaded, and the adapter merged into it."""
    if "lora" in checkpoint:
        model, tokenizer = lora_model_from_checkpoint(checkpoint, dropout=dropout)
        return lora.merge_and_remove(model).to(device), tokenizer
    model_config = dict(checkpoint["model_config"])
    if dropout is not None:
        model_config["dropout"] = dropout
    try:
        model = GPT.uninitialised(GPTConfig(**model_config))
        model.load_state_dict(upgrade_state_dict(checkpoint["model"]))
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint does not match the model: {str(e).splitlines()[0][:200]}") from None
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
    return model.to(device), tokenizer


def checkpoint_of(model, tokenizer):
    """A model and its tokenizer as a checkpoint at step 0 (an imported model as the start of a
    run, or a model built in memory), so everything that reads checkpoints takes it."""
    return {"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
            "tokenizer": tokenizer.to_dict(), "config": {}, "step": 0}


def cast_weights(model, dtype):
    """The parameters (not the buffers: RoPE's frequencies stay float32) in `dtype`."""
    if dtype is not None:
        for parameter in model.parameters():  # a tied matrix is one parameter: cast once
            parameter.data = parameter.data.to(dtype)
    return model


def is_gguf(init_from):
    """Whether --init_from names a GGUF file (llama.cpp's format)."""
    return init_from.lower().endswith(".gguf")


def is_imported(init_from):
    """Whether --init_from names a model made elsewhere (GPT-2, a Hugging Face folder or hub
    name, a GGUF file) rather than a checkpoint of this project."""
    return init_from in GPT2_SIZES or init_from.startswith("hf:") or is_gguf(init_from)


def load_model(init_from, out_dir, device="cpu", dtype=None, quant=""):
    """The one way the scripts get a model: (model, tokenizer, source), the weights in `dtype`
    (None: float32, as trained and as files store them), and with quant="q8_0" the weight
    matrices and embedding in 8 bits (model/quant.py: for generation and evaluation, not training).

    init_from: "resume" (out_dir/ckpt.pt, or out_dir itself when it is a file), a path to a
    ckpt.pt, gpt2 | gpt2-medium | gpt2-large | gpt2-xl (OpenAI's weights on the Hugging Face
    hub), hf:<local folder> | hf:<owner/name>, or the path of a .gguf file (llama.cpp's format).
    `source` describes where the model came from, for messages and JSON: {"init_from", "step"
    (None for an imported model), "path", "sample_prompt" (what its training run sampled from;
    None for an imported model)}."""
    if init_from in GPT2_SIZES:
        init_from = f"hf:{init_from}"
    if init_from.startswith("hf:"):
        from model.hf import load_hf_model, resolve_hf_folder  # only imported models need the hub

        folder = resolve_hf_folder(init_from[len("hf:"):])
        model, tokenizer = load_hf_model(folder)
        model = quantize_model(cast_weights(model.to(device), dtype), quant)
        return model, tokenizer, {"init_from": init_from, "step": None, "path": folder, "sample_prompt": None}
    if is_gguf(init_from):
        from model.gguf import load_gguf_model

        model, tokenizer = load_gguf_model(init_from)
        model = quantize_model(cast_weights(model.to(device), dtype), quant)
        return model, tokenizer, {"init_from": init_from, "step": None, "path": init_from, "sample_prompt": None}
    path = out_dir if init_from == "resume" else init_from
    checkpoint = load_checkpoint(path, map_location="cpu")
    model, tokenizer = model_from_checkpoint(checkpoint, device=device)
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    return quantize_model(cast_weights(model, dtype), quant), tokenizer, {"init_from": init_from, "step": checkpoint["step"], "path": path,
                                          "sample_prompt": checkpoint["config"].get("sample_prompt")}


# ---- LoRA runs: an adapter and a reference to its base ----------------------------------------

def load_base(reference, dropout=None):
    """The base model a LoRA run names (a checkpoint path, gpt2*, hf:... or a .gguf path): (model, tokenizer)."""
    if is_imported(reference):
        model, tokenizer, _ = load_model(reference, out_dir=None)
        if dropout is None:
            return model, tokenizer
        checkpoint = checkpoint_of(model, tokenizer)  # training: rebuilt with its dropout
    else:
        checkpoint = load_checkpoint(reference)
    return model_from_checkpoint(checkpoint, dropout=dropout)


def lora_base_from_checkpoint(checkpoint, dropout=None):
    """A LoRA run's base model, checked against the SHA-256 of the weights it was trained on."""
    settings = checkpoint["lora"]
    reference = settings["base"]
    try:
        model, tokenizer = load_base(reference, dropout=dropout)
    except UserError as e:
        raise UserError(f"cannot load the LoRA run's base model {reference}: {e}") from None
    if lora.weights_sha256(model) != settings["base_sha256"]:
        raise UserError(f"the LoRA run's base model {reference} has changed since the adapter was trained "
                        f"(its weights' SHA-256 differs from {settings['base_sha256'][:12]}...); "
                        "the adapter only fits the original weights")
    return model, tokenizer


def lora_model_from_checkpoint(checkpoint, dropout=None):
    """The base with the run's adapters on it, not merged (what training continues from)."""
    model, tokenizer = lora_base_from_checkpoint(checkpoint, dropout=dropout)
    settings = checkpoint["lora"]
    lora.add_lora(model, settings["rank"], settings["alpha"], settings["dropout"], settings["targets"])
    lora.load_adapter_state_dict(model, checkpoint["model"])
    return model, tokenizer
