"""Talk to a chat model through its own chat template.

    python chat.py --init_from=hf:HuggingFaceTB/SmolLM2-135M-Instruct            # interactive, multi-turn
    python chat.py --init_from=hf:... --prompt="What is a tokenizer?"            # one turn: the reply on stdout
    python chat.py --init_from=hf:... --system="Answer in one sentence." < questions.txt   # one turn per line
    python chat.py --out_dir=out-faq                                             # a model fine-tuned here

Each turn, the whole conversation is written out by the model's template (see model/chat.py and
/show) and the model continues it until it writes its end-of-turn marker. The conversation's KV
cache is kept between turns, so a new turn computes only its own tokens, never the history
again; when the context is full, the oldest turns are dropped (and you are told). Ctrl-C stops
a reply, not the conversation; Ctrl-D (or /exit) ends it. Commands: /reset (start over, the
system prompt kept), /show (the conversation as the model reads it, special tokens and all, and
its length), /probs (the last reply token by token: each token's probability and rank).

Replies go to stdout, everything else (tokens/s, notes, commands' output) to stderr. Standard
input that is not a terminal is read as one user turn per line (commands work there too), so
`/reset` between lines asks independent questions.
"""

import time

STARTED = time.perf_counter()  # before importing torch: time to first token counts the whole start-up

import codecs
import sys
from dataclasses import dataclass

import torch

from model.chat import (advance, end_of_turn_ids, end_of_turn_text, fit_context, grow_cache, is_instruction_tuned,
                        render_chat)
from model.checkpoint import load_model
from model.cli import (SamplingOptions, check_sampling_options, field, main_guard, parse_config, pick_dtype,
                       read_prompt, resolve_device)
from model.errors import UserError
from model.gpt import sample_next_token
from model.kernels import generation_description
from model.quant import weights_description

USAGE = "usage: python chat.py [--init_from=MODEL] [--system=TEXT] [--prompt=TEXT|FILE:path] [--field=value ...]"
COMMANDS = "/reset /show /probs /exit"


@dataclass
class ChatConfig(SamplingOptions):
    prompt: str = field("", "one user turn, or FILE:path: print the reply and exit ('' = interactive, or one turn "
                            "per line of standard input when it is not a terminal)")
    system: str = field("", "a system message that opens the conversation ('' = none; a template may add its own)")


def say(*parts):
    print(*parts, file=sys.stderr, flush=True)


def new_conversation(cfg):
    return [{"role": "system", "content": cfg.system}] if cfg.system else []


class Chat:
    """One conversation with one model: its messages, and the KV cache of the ids last read."""

    def __init__(self, model, tokenizer, cfg, device):
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.messages = new_conversation(cfg)
        self.cache, self.cached_ids = None, []
        self.stop_ids, self.stop_text = end_of_turn_ids(tokenizer), end_of_turn_text(tokenizer)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.last_reply = []  # (token id, probability, rank) of each token of the last reply
        block_size = model.config.block_size
        # room kept for a reply: max_new_tokens, but never more than half the context
        self.reserve = min(cfg.max_new_tokens, block_size // 2)

    def reply(self, text, out):
        """Add the user's turn, stream the reply to `out`, add it to the conversation; the reply."""
        block_size = self.model.config.block_size
        self.messages.append({"role": "user", "content": text})
        try:
            ids, dropped = fit_context(self.tokenizer, self.messages, block_size, self.reserve)
        except UserError:
            self.messages.pop()
            raise
        if dropped:
            say(f"[the context is full: dropped the oldest {dropped} message(s); {len(ids)} tokens now]")
        started = time.perf_counter()
        with torch.inference_mode():
            try:
                self.cache, logits, new_tokens = advance(self.model, self.cache, self.cached_ids, ids)
            except KeyboardInterrupt:  # stopped while reading the turn: no reply, the turn is taken back
                self.messages.pop()  # (the cache stays consistent: advance cut it to the common start)
                say("[stopped]")
                return ""
            self.cached_ids = list(ids)
            read_at = time.perf_counter()
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            reply_ids, self.last_reply, note = [], [], ""
            decode_token = False  # not made yet (model.token_decoder: C on a CPU where it can)
            try:
                for _ in range(self.cfg.max_new_tokens):
                    token = sample_next_token(logits, self.cfg.temperature, self.cfg.top_k or None, self.cfg.top_p,
                                              self.generator)
                    probs = logits.float().softmax(-1)
                    rank = int((probs > probs[token]).sum()) + 1
                    self.last_reply.append((token, float(probs[token]), rank))
                    if token in self.stop_ids:
                        break
                    reply_ids.append(token)
                    out.write(decoder.decode(self.tokenizer.token_bytes(token)))
                    out.flush()
                    if self.stop_text and self.tokenizer.decode(reply_ids).endswith(self.stop_text):
                        break
                    if len(self.cached_ids) >= block_size:
                        note = " (the context is full)"
                        break
                    grown = grow_cache(self.model, self.cache, len(self.cached_ids) + 1)
                    if grown is not self.cache or decode_token is False:  # (a new cache needs its own decoder)
                        self.cache, decode_token = grown, self.model.token_decoder(grown)
                    if decode_token is not None:
                        logits = decode_token(token)[0, -1]
                    else:
                        logits = self.model(torch.tensor([[token]], device=self.device), kv_cache=self.cache)[0][0, -1]
                    self.cached_ids.append(token)
            except KeyboardInterrupt:
                note = " (stopped)"
        out.write(decoder.decode(b"", final=True) + "\n")
        out.flush()
        answer = self.tokenizer.decode(reply_ids)
        if self.stop_text and answer.endswith(self.stop_text):
            answer = answer[:-len(self.stop_text)]
        self.messages.append({"role": "assistant", "content": answer})
        finished = time.perf_counter()
        count = len(self.last_reply)
        rate = (count - 1) / max(finished - read_at, 1e-9) if count > 1 else 0.0
        say(f"[{count} tokens in {finished - read_at:.2f} s, {rate:.1f} tokens/s{note}; read {new_tokens} new tokens "
            f"of {len(ids)} in {read_at - started:.2f} s]")
        return answer

    def command(self, line):
        """Run a /command; False for /exit."""
        name = line.split()[0]
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.messages, self.last_reply = new_conversation(self.cfg), []
            say("[a new conversation]")  # the cache stays: the next turn reuses what still matches
        elif name == "/show":
            text = render_chat(self.tokenizer, self.messages, add_generation_prompt=False) if self.messages else ""
            length = len(self.tokenizer.encode(text, allow_special=True))
            block_size = self.model.config.block_size
            say(text + f"\n[{len(self.messages)} messages, {length} tokens; {block_size - length} of the context's "
                f"{block_size} left]")
        elif name == "/probs":
            if not self.last_reply:
                say("[no reply yet]")
            for token, probability, rank in self.last_reply:
                text = self.tokenizer.token_bytes(token).decode("utf-8", errors="backslashreplace")
                say(f"  {text!r:<24} p={probability:.4f}  rank {rank}")
        else:
            say(f"[unknown command {name}; commands: {COMMANDS}]")
        return True


def interactive(chat):
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    say(f"[commands: {COMMANDS}; Ctrl-C stops a reply, Ctrl-D ends the conversation]")
    while True:
        try:
            line = input("you> ").strip()
        except KeyboardInterrupt:
            print()
            continue
        except EOFError:
            print()
            return
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                return
            continue
        try:
            chat.reply(line, sys.stdout)
        except UserError as e:  # this message cannot be read: the conversation goes on without it
            say(f"error: {e}")


def main():
    cfg, given = parse_config(ChatConfig, sys.argv[1:], USAGE, return_given=True)
    check_sampling_options(cfg)
    device = resolve_device(cfg.device)
    one_shot = "prompt" in given
    prompt = None
    if one_shot:
        if not cfg.prompt.strip():
            raise UserError("--prompt is empty: give the user's message (or leave --prompt out to chat)")
    model, tokenizer, source = load_model(cfg.init_from, cfg.out_dir, device=device,
                                          dtype=pick_dtype(cfg.dtype, device.split(":")[0]), quant=cfg.quant)
    model.eval()
    if one_shot:
        _, prompt = read_prompt(cfg.prompt, tokenizer)
        if not prompt.strip():
            raise UserError("the prompt is empty")
    # a template that cannot write this conversation (a system message where it has no system role)
    # fails here, before anything else is printed
    render_chat(tokenizer, new_conversation(cfg) + [{"role": "user", "content": prompt or "Hi"}])
    origin = f"step {source['step']}" if source["step"] is not None else source["init_from"]
    say(f"model: {model.num_params():,} parameters{weights_description(cfg.quant)}, {origin}, "
        f"context {model.config.block_size} tokens; new tokens {generation_description(model, device)}")
    if not is_instruction_tuned(tokenizer):
        say("note: this model has no chat template, so it was not instruction-tuned; talking to it through the "
            "default ChatML template (model/chat.py), whose markers it reads as plain text")
    chat = Chat(model, tokenizer, cfg, device)
    if one_shot:
        chat.reply(prompt, sys.stdout)
    elif sys.stdin.isatty():
        interactive(chat)
    else:
        for line in sys.stdin:
            line = line.strip()
            if line.startswith("/"):
                if not chat.command(line):
                    break
            elif line:
                chat.reply(line, sys.stdout)


if __name__ == "__main__":
    main_guard(main)
