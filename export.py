"""Export a checkpoint as one flat file of numbers that run.py (numpy alone) can run,
as a Hugging Face model folder that transformers loads, or as a GGUF file for llama.cpp and ollama.

    python export.py --out_dir=out                 # out/ckpt.pt -> out/model.bin
    python run.py out/model.bin --prompt="def "    # no torch needed from here on
    python export.py --out_dir=out --quant=q8_0   # 8-bit matrices (model.bin version 3): 0.27x the size
    python export.py --out_dir=out --format=hf --output=my-model   # AutoModelForCausalLM.from_pretrained("my-model")
    python export.py --out_dir=out-lora --format=peft --output=adapter   # a LoRA run's adapter for peft
    python export.py --out_dir=out --format=gguf --output=out/model.gguf --quant=q8_0   # llama.cpp, ollama

A LoRA run's out_dir exports the merged model (its base with the adapter added in), or with
--format=peft the adapter alone.

The file holds a small header (the model's sizes), the tokenizer (every token's bytes),
then every weight as little-endian float32 (with --quant=q8_0: every matrix as int8 groups
of 32 and their float16 scales), in the order run.weight_layout lists them.
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

from model import gpt, lora
from model.checkpoint import is_imported, load_checkpoint, load_model
from model.cli import field, main_guard, parse_config
from model.errors import UserError
from model.files import atomic_write
from model.quant import check_quant, quantize_rows, row_scales_as_groups
from model.tokenizer import GPT2_SPLIT_PATTERN, split_rule_of
# run.py must stay standalone (numpy alone), so the file layout's one home is run.py, its reader:
# this writer imports it from there and the two can never disagree.
from run import (ACTIVATIONS, ARCHS, GROUP_SIZE, HEADER, MAGIC, TOKENIZER_KINDS, VERSION, VERSION_8BIT, Config,
                 Tokenizer, weight_layout)

USAGE = "usage: python export.py [--out_dir=out] [--init_from=resume] [--format=bin|hf|peft|gguf] [--output=out/model.bin] [--quant=q8_0]"
FORMATS = ("bin", "hf", "peft", "gguf")
# Text that exercises every part of the split rules: run.py's encoder must give it the tokenizer's ids.
CHECK_TEXT = ("Hello, world! It's 2024: don't WE'LL 12345 3.14 x²  \t tabs\n\n\r\n  spaces   end\n"
              "café naïve Ωmega 日本語の文章 😀👍 १२३ ١٢٣ <b>a+=1;</b> $(pwd) 'quoted' \u3000ideo\u00a0nbsp ")


@dataclass
class ExportConfig:
    out_dir: str = field("out", "folder with ckpt.pt (or the path of a checkpoint file)")
    init_from: str = field("resume", "resume (the checkpoint in --out_dir) | path/to/ckpt.pt | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | hf:<folder or owner/name> | path/to/model.gguf")
    format: str = field("bin", "bin (one file for run.py) | hf (a folder for transformers' from_pretrained) | "
                        "peft (a LoRA run's adapter alone, for the peft library) | gguf (one file for llama.cpp and ollama)")
    output: str = field("", "file (bin, gguf) or folder (hf, peft) to write ('' = model.bin, hf/, adapter/ or "
                        "model.gguf next to the checkpoint)")
    quant: str = field("", "how the weights are stored. bin: '' = float32 (format version 2) | q8_0 = every matrix, "
                       "the embedding too, as int8 groups of 32 with a float16 scale each (version 3, 0.27x the size); "
                       "gguf: f32 (= '') | f16 | q8_0 | q4_0 (blocks of 32 numbers sharing one scale, 8 or 4 bits each)")


def length_prefixed(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def file_config(model):
    """Everything run.py's forward pass needs to know about the model's shape."""
    c = model.config
    return Config(c.arch, c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.head_size,
                  c.mlp_hidden, c.tie_embeddings, c.mlp_activation, c.qk_norm, c.norm_eps, c.logit_softcap)


def hf_tokenizer_for_run(tokenizer):
    """(split rule, whole_chunk_first, merges, prompt_starts_with_bos) of a Hugging Face tokenizer.json,
    or a UserError when run.py cannot encode with it (run.py knows byte-level BPE only)."""
    from tokenizers import Tokenizer as RustTokenizer  # the reference: what ids the text should get

    text = tokenizer.to_dict()["tokenizer_json"]
    spec = json.loads(text)
    model, pre_tokenizer = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    rule = split_rule_of(pre_tokenizer)
    if (model.get("type") != "BPE" or rule is None or spec.get("normalizer") or model.get("byte_fallback")
            or model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")):
        steps = [pre_tokenizer] + pre_tokenizer.get("pretokenizers", [])
        described = ", ".join(s.get("type", "?") for s in steps if s.get("type") not in (None, "Sequence")) or "none"
        raise UserError(f"run.py cannot encode this model's tokenizer ({model.get('type')} model, pre-tokenizer "
                        f"{described}, normalizer {(spec.get('normalizer') or {}).get('type', 'none')}): it knows "
                        f"byte-level BPE split the way GPT-2, SmolLM2 or Llama 3 split text. sample.py and explain.py "
                        f"run this model")
    vocab = model["vocab"]
    # merges are "left right" strings (older files) or [left, right] lists, highest priority first
    merges = [vocab[a] for m in model["merges"] for a in (m.split(" ") if isinstance(m, str) else m)]
    merges = list(zip(merges[::2], merges[1::2]))
    reference = RustTokenizer.from_str(text)
    plain, full = reference.encode(CHECK_TEXT, add_special_tokens=False).ids, reference.encode(CHECK_TEXT).ids
    starts_with_bos = full != plain
    if starts_with_bos and full != [tokenizer.bos_id] + plain:
        raise UserError("run.py cannot encode this model's prompts: its tokenizer adds special tokens other "
                        "than one start-of-text token in front")
    return rule, bool(model.get("ignore_merges")), merges, starts_with_bos, plain


def tokenizer_section(tokenizer, vocab_size):
    """The tokenizer as run.py reads it, byte for byte (README.md: "2. Tokenizer"). Ids past the
    tokenizer's own (a model's embedding may have spare rows) are tokens of no bytes."""
    token_bytes = [tokenizer.token_bytes(i) if i < tokenizer.vocab_size else b"" for i in range(vocab_size)]
    bos_id = getattr(tokenizer, "bos_id", None)
    if tokenizer.kind == "hf":
        rule, whole_chunk_first, merges, starts_with_bos, expected = hf_tokenizer_for_run(tokenizer)
        ours = Tokenizer("hf", token_bytes, tokenizer.eos_id, bos_id, starts_with_bos, rule, whole_chunk_first, merges)
        if ours.encode(CHECK_TEXT) != expected:  # never write a file that would encode prompts wrongly
            raise UserError("run.py's encoder does not reproduce this tokenizer's ids, so run.py cannot run it")
    else:  # tiktoken's rule: a pair's rank is its joined token's id, so no merge list is stored
        if tokenizer.kind != "char" and tokenizer.pattern != GPT2_SPLIT_PATTERN:
            raise UserError("run.py only knows GPT-2's split pattern, and this tokenizer uses another")
        rule, whole_chunk_first, merges, starts_with_bos = ("" if tokenizer.kind == "char" else "gpt2"), True, [], False
    section = struct.pack("<IiiI", TOKENIZER_KINDS.index(tokenizer.kind), -1 if bos_id is None else bos_id,
                          -1 if tokenizer.eos_id is None else tokenizer.eos_id, starts_with_bos)
    section += length_prefixed(rule.encode()) + struct.pack("<II", whole_chunk_first, len(token_bytes))
    section += b"".join(length_prefixed(b) for b in token_bytes)
    return section + struct.pack(f"<I{2 * len(merges)}I", len(merges), *(i for pair in merges for i in pair))


def export_model(model, tokenizer, path, quant=""):
    """Write the model and its tokenizer to `path` atomically (temporary file, then rename).
    quant="q8_0": every matrix as int8 groups and float16 scales (format version 3), the numbers
    the model runs with under --quant=q8_0."""
    config = file_config(model)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"the checkpoint's tokenizer has {tokenizer.vocab_size} ids but the model only {config.vocab_size}")
    layout = weight_layout(config)
    if quant and any(len(shape) == 2 and shape[1] % GROUP_SIZE for _, shape in layout):
        raise UserError(f"--quant={quant} stores groups of {GROUP_SIZE} numbers, and this model has rows of "
                        f"{', '.join(sorted({str(s[1]) for _, s in layout if len(s) == 2 and s[1] % GROUP_SIZE}))}")
    version = VERSION_8BIT if quant else VERSION
    header = HEADER.pack(MAGIC, version, ARCHS.index(config.arch), config.vocab_size, config.block_size,
                         config.n_layer, config.n_head, config.n_kv_head, config.n_embd, config.head_size,
                         config.mlp_hidden, config.tie_embeddings, ACTIVATIONS.index(config.mlp_activation),
                         config.qk_norm, config.norm_eps, config.logit_softcap)
    header += tokenizer_section(tokenizer, config.vocab_size)
    header += bytes(-len(header) % 64)  # zeros up to a multiple of 64: the weights start aligned

    # the RoPE frequencies (with any llama3 scaling) are written out, so run.py needs no formula for them
    state = {**model.state_dict(), "rope.inv_freq": gpt.rope_frequencies(model.config)}
    with atomic_write(path) as f:
        f.write(header)
        for name, shape in layout:
            tensor = state[name].detach().to(torch.float32).cpu()
            if name in ("wte.weight", "lm_head.weight"):
                tensor = tensor[:config.vocab_size]  # the padded rows are never scored: leave them out
            assert tuple(tensor.shape) == shape, (name, tuple(tensor.shape), shape)
            if quant and len(shape) == 2:  # a matrix: its int8 values, then its scales
                # the numbers sample.py --quant=q8_0 runs with (one scale per row, given to each group)
                values, scale = quantize_rows(tensor)
                f.write(values.numpy().tobytes() + row_scales_as_groups(scale, shape[1]).numpy().astype("<f2").tobytes())
            else:
                f.write(tensor.numpy().astype("<f4").tobytes())


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
    imported = is_imported(cfg.init_from)
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
    if cfg.quant and cfg.format in ("hf", "peft"):
        raise UserError(f"--quant is for --format=bin or gguf; --format={cfg.format} writes float32")
    if cfg.format == "bin":
        check_quant(cfg.quant)
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
    if cfg.format == "gguf":
        from model.gguf import save_gguf_model

        output = cfg.output or os.path.join(checkpoint_dir, "model.gguf")
        if os.path.isdir(output):
            raise UserError(f"--output={output} is a folder; give a file name such as {os.path.join(output, 'model.gguf')}")
        try:
            save_gguf_model(model, tokenizer, output, cfg.quant)
        except OSError as e:
            raise UserError(f"cannot write {output}: {e.strerror}") from None
        print(f"wrote {output}: {model.config.arch}, {model.num_params():,} parameters as {cfg.quant or 'f32'}, "
              f"{os.path.getsize(output) / 1e6:.2f} MB, {tokenizer.vocab_size:,} tokens")
        print(f"run it with llama.cpp: llama-cli -m {output} -p \"...\"  (or in ollama: FROM {output} in a Modelfile)")
        return
    output = cfg.output or os.path.join(checkpoint_dir, "model.bin")
    if os.path.isdir(output):
        raise UserError(f"--output={output} is a folder; give a file name such as {os.path.join(output, 'model.bin')}")
    try:
        export_model(model, tokenizer, output, cfg.quant)
    except OSError as e:
        raise UserError(f"cannot write {output}: {e.strerror}") from None
    n_params = sum(math.prod(shape) for _, shape in weight_layout(file_config(model)))
    precision = "float32 parameters" if not cfg.quant else "parameters, matrices in 8 bits (q8_0)"
    print(f"wrote {output}: {model.config.arch}, {n_params:,} {precision}, "
          f"{os.path.getsize(output) / 1e6:.2f} MB, "
          f"{tokenizer.kind} tokenizer with {tokenizer.vocab_size:,} tokens")
    print(f"run it with numpy alone: python run.py {output} --prompt=\"...\"")


if __name__ == "__main__":
    main_guard(main)
