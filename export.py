"""Export a checkpoint as one flat file of numbers that run.py (numpy alone) can run,
or as a Hugging Face model folder that transformers loads.

    python export.py --out_dir=out                 # out/ckpt.pt -> out/model.bin
    python run.py out/model.bin --prompt="def "    # no torch needed from here on
    python export.py --out_dir=out --format=hf --output=my-model   # AutoModelForCausalLM.from_pretrained("my-model")
    python export.py --out_dir=out-lora --format=peft --output=adapter   # a LoRA run's adapter for peft

A LoRA run's out_dir exports the merged model (its base with the adapter added in), or with
--format=peft the adapter alone.

The file holds a small header (the model's sizes), the tokenizer (every token's bytes),
then every weight as little-endian float32, in the order run.weight_layout lists them.
The layout is defined once, by its reader, so the two can never disagree. README.md
describes the format byte by byte.
"""

import json
import math
import os
import struct
import sys
from dataclasses import dataclass

import torch

from model import lora
from model.checkpoint import GPT2_SIZES, load_checkpoint, load_model
from model.cli import field, main_guard, parse_config
from model.errors import UserError
from model.files import atomic_write
from run import ARCHS, HEADER, MAGIC, TOKENIZER_KINDS, VERSION, Config, weight_layout

USAGE = "usage: python export.py [--out_dir=out] [--init_from=resume] [--format=bin|hf|peft] [--output=out/model.bin]"
FORMATS = ("bin", "hf", "peft")


@dataclass
class ExportConfig:
    out_dir: str = field("out", "folder with ckpt.pt (or the path of a checkpoint file)")
    init_from: str = field("resume", "resume (the checkpoint in --out_dir) | path/to/ckpt.pt | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | hf:<folder or owner/name>")
    format: str = field("bin", "bin (one file for run.py) | hf (a folder for transformers' from_pretrained) | "
                        "peft (a LoRA run's adapter alone, for the peft library)")
    output: str = field("", "file (bin) or folder (hf, peft) to write ('' = model.bin, hf/ or adapter/ next to the checkpoint)")


def length_prefixed(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def file_config(model):
    """Everything run.py's forward pass needs to know about the model's shape."""
    c = model.config
    return Config(c.arch, c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd, c.mlp_hidden,
                  model.ln_f.eps, c.rope_theta)


def export_model(model, tokenizer, path):
    """Write the model and its tokenizer to `path` atomically (temporary file, then rename)."""
    config = file_config(model)
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(f"the checkpoint's tokenizer has {tokenizer.vocab_size} ids but the model {config.vocab_size}")
    header = HEADER.pack(MAGIC, VERSION, ARCHS.index(config.arch), config.vocab_size, config.block_size,
                         config.n_layer, config.n_head, config.n_embd, config.mlp_hidden,
                         config.norm_eps, config.rope_theta)
    eos_id = -1 if tokenizer.eos_id is None else tokenizer.eos_id
    header += struct.pack("<Ii", TOKENIZER_KINDS.index(tokenizer.kind), eos_id)
    header += length_prefixed(getattr(tokenizer, "pattern", "").encode("utf-8"))
    header += struct.pack("<I", tokenizer.vocab_size)
    header += b"".join(length_prefixed(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
    header += bytes(-len(header) % 64)  # zeros up to a multiple of 64: the weights start aligned

    state = model.state_dict()
    with atomic_write(path) as f:
        f.write(header)
        for name, shape in weight_layout(config):
            tensor = state[name]
            if name == "wte.weight":
                tensor = tensor[:config.vocab_size]  # the padded rows are never scored: leave them out
            assert tuple(tensor.shape) == shape, (name, tuple(tensor.shape), shape)
            f.write(tensor.detach().to(torch.float32).cpu().numpy().astype("<f4").tobytes())


def export_peft(checkpoint, folder):
    """A LoRA run's adapter as adapter_config.json + adapter_model.safetensors (the adapter
    alone: peft puts it onto the base's weights in transformers)."""
    from safetensors.torch import save as safetensors_bytes

    config, tensors = lora.peft_adapter(checkpoint["model"], checkpoint["model_config"], checkpoint["lora"])
    if os.path.isfile(folder):
        raise UserError(f"--output={folder} is a file; --format=peft writes a folder")
    with atomic_write(os.path.join(folder, "adapter_model.safetensors")) as f:
        f.write(safetensors_bytes({name: t.float().contiguous() for name, t in tensors.items()}))
    with atomic_write(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return sum(t.numel() for t in tensors.values())


def export_adapter(cfg):
    """--format=peft: the adapter is in the LoRA run's checkpoint; its base is not needed."""
    imported = cfg.init_from.startswith("hf:") or cfg.init_from in GPT2_SIZES
    path = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
    checkpoint = {} if imported else load_checkpoint(path, map_location="cpu")
    if "lora" not in checkpoint:
        raise UserError(f"{path} is not a LoRA run: --format=peft exports an adapter (train one with --lora_rank=8)")
    checkpoint_dir = path if os.path.isdir(path) else os.path.dirname(path)
    output = cfg.output or os.path.join(checkpoint_dir, "adapter")
    try:
        n_params = export_peft(checkpoint, output)
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror}") from None
    print(f"wrote {output}/adapter_config.json and adapter_model.safetensors: {n_params:,} adapter parameters "
          f"for the base {checkpoint['lora']['base']}")
    print("load it in transformers onto the base's --format=hf export: "
          f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_EXPORT), {output!r})")


def main():
    cfg = parse_config(ExportConfig, sys.argv[1:], USAGE)
    if cfg.format not in FORMATS:
        raise UserError(f"--format must be {', '.join(FORMATS[:-1])} or {FORMATS[-1]}, not {cfg.format!r}")
    if cfg.format == "peft":
        export_adapter(cfg)
        return
    model, tokenizer, source = load_model(cfg.init_from, cfg.out_dir)
    checkpoint_dir = cfg.out_dir if source["step"] is None else os.path.dirname(source["path"])
    if cfg.format == "hf":
        from model.hf import save_hf_model

        output = cfg.output or os.path.join(checkpoint_dir, "hf")
        try:
            save_hf_model(model, tokenizer, output)
        except OSError as e:
            raise UserError(f"cannot write {output}: {e.strerror}") from None
        print(f"wrote {output}/: config.json, model.safetensors ({model.config.arch}, {model.num_params():,} "
              f"parameters), tokenizer.json")
        print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({output!r}), "
              f"AutoTokenizer.from_pretrained({output!r})")
        return
    output = cfg.output or os.path.join(checkpoint_dir, "model.bin")
    if os.path.isdir(output):
        raise UserError(f"--output={output} is a folder; give a file name such as {os.path.join(output, 'model.bin')}")
    try:
        export_model(model, tokenizer, output)
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror}") from None
    n_params = sum(math.prod(shape) for _, shape in weight_layout(file_config(model)))
    print(f"wrote {output}: {model.config.arch}, {n_params:,} float32 parameters, "
          f"{os.path.getsize(output) / 1e6:.2f} MB, "
          f"{tokenizer.kind} tokenizer with {tokenizer.vocab_size:,} tokens")
    print(f"run it with numpy alone: python run.py {output} --prompt=\"...\"")


if __name__ == "__main__":
    main_guard(main)
