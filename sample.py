"""Sample text from a trained model, streaming it as it is generated.

    python sample.py                                  # from out/ckpt.pt
    python sample.py --prompt="def main(" --max_new_tokens=300 --temperature=0.8
    python sample.py --prompt=FILE:prompt.txt --temperature=0   # greedy, from a file's text
    python sample.py --init_from=gpt2 --prompt="Hello, I'm a language model,"   # GPT-2 from the hub

The text goes to stdout, everything else to stderr. Same seed, checkpoint and device:
the same text.
"""

import time

STARTED = time.perf_counter()  # before importing torch: time to first token counts the whole start-up

import codecs
import sys
from dataclasses import dataclass

import torch

from model.checkpoint import load_model
from model.cli import (SamplingOptions, check_sampling_options, field, main_guard, parse_config, pick_dtype,
                       read_prompt, resolve_device)
from model.errors import UserError
from model.kernels import generation_description
from model.quant import weights_description

USAGE = "usage: python sample.py [--out_dir=out] [--prompt=TEXT|FILE:path] [--field=value ...]"


@dataclass
class SampleConfig(SamplingOptions):
    num_samples: int = field(1, "how many samples to draw")
    kv_cache: bool = field(True, "reuse keys/values of earlier positions (false = recompute the whole context per token)")


def check_config(cfg):
    check_sampling_options(cfg)
    if cfg.num_samples < 1:
        raise UserError("--num_samples must be at least 1")


def main():
    cfg = parse_config(SampleConfig, sys.argv[1:], USAGE)
    check_config(cfg)
    device = resolve_device(cfg.device)
    model, tokenizer, source = load_model(cfg.init_from, cfg.out_dir, device=device,
                                          dtype=pick_dtype(cfg.dtype, device.split(":")[0]), quant=cfg.quant)
    model.eval()
    prompt_ids, prompt_text = read_prompt(cfg.prompt, tokenizer, source["sample_prompt"])
    block_size = model.config.block_size
    origin = f"step {source['step']}" if source["step"] is not None else source["init_from"]
    print(f"model: {model.num_params():,} parameters{weights_description(cfg.quant)}, {origin}, "
          f"{tokenizer.kind} tokenizer; prompt: {len(prompt_ids)} tokens"
          + (f" (cropped to the last {block_size})" if len(prompt_ids) > block_size else "")
          + f"; new tokens {generation_description(model, device, cfg.kv_cache)}", file=sys.stderr)

    torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    for sample_index in range(cfg.num_samples):
        if sample_index:
            print("\n---------------")
        sys.stdout.write(prompt_text)
        # tokens can end in the middle of a UTF-8 character; the incremental decoder waits for the rest
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        started, first_token_at, count = time.perf_counter(), None, 0
        for token_id in model.generate(prompt_ids, cfg.max_new_tokens, temperature=cfg.temperature,
                                       top_k=cfg.top_k or None, top_p=cfg.top_p, eos_id=tokenizer.eos_id,
                                       generator=generator, use_kv_cache=cfg.kv_cache):
            count += 1
            first_token_at = first_token_at or time.perf_counter()
            if token_id == tokenizer.eos_id:
                break
            sys.stdout.write(decoder.decode(tokenizer.token_bytes(token_id)))
            sys.stdout.flush()
        sys.stdout.write(decoder.decode(b"", final=True) + "\n")
        sys.stdout.flush()
        finished = time.perf_counter()
        # tokens/s counts the tokens after the first (the first one also pays for reading the prompt)
        rate = (count - 1) / max(finished - first_token_at, 1e-9) if count > 1 else 0.0
        first = f"; first token after {first_token_at - STARTED:.2f} s" if first_token_at and not sample_index else ""
        print(f"[{count} tokens in {finished - started:.2f} s, {rate:.1f} tokens/s{first}]", file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)
