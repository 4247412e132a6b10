"""Chat: a conversation is one long text in which a template marks whose turn it is.

An instruction-tuned model was trained on conversations written out by its own chat template,
a small Jinja program that travels with its tokenizer (`tokenizer.chat_template`). SmolLM2's
writes each message as

    <|im_start|>user
    What is the capital of France?<|im_end|>
    <|im_start|>assistant
    The capital of France is Paris.<|im_end|>

and asking the model for a reply means writing the conversation so far, then the opening of
the assistant's turn (the "generation prompt"), and letting it continue until it writes its
end-of-turn marker. Fine-tuning on conversations is the ordinary next-token loss, taken only
on the tokens the assistant says (`encode_conversation`'s mask).

The template is rendered as transformers renders it (jinja2's sandbox, the same options,
filters and variables; transformers' apply_chat_template is the reference the tests compare
with), and the text is then encoded with the template's markers read as special tokens.

A model that came without a template (GPT-2, a model trained here) gets DEFAULT_CHAT_TEMPLATE,
ChatML, whose two markers become new special tokens when it is taught to chat (data/prepare.py
adds them, train.py grows the embedding by their rows, and fine-tuning trains those rows).
"""

import functools

import torch

from model.errors import UserError
from model.gpt import KVCache
from model.tokenizer import with_special_tokens

# ChatML (the format of SmolLM2 and Qwen): the most widely used, and its markers are plainly
# markers, never text. A message's end marker is followed by a newline, as in SmolLM2's template.
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>")
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


# ---- rendering ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def compile_template(template: str):
    """The template compiled the way transformers compiles it: a sandbox that refuses access to
    Python's internals (templates come from model hubs: untrusted code), trim_blocks and
    lstrip_blocks (templates are written expecting them), loop controls, a tojson that keeps
    non-ASCII text as is, raise_exception, strftime_now, a namespace() that stores no _names,
    and {% generation %} blocks (a
    marker for transformers' assistant mask) rendered as their content."""
    import datetime
    import json

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            line = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(line)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    class Namespace(jinja2.utils.Namespace):
        # the sandbox reads no _attributes, and a namespace must not store them either
        def __setitem__(self, name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot store {name!r} on a namespace")
            super().__setitem__(name, value)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["namespace"] = Namespace
    environment.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    try:
        return environment.from_string(template)
    except jinja2.TemplateError as e:
        raise UserError(f"the chat template is not valid Jinja: {e}") from None


def token_text(tokenizer, token_id):
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace") if token_id is not None else None


def check_messages(messages):
    """A conversation: a non-empty list of {"role": system|user|assistant, "content": text}."""
    if not isinstance(messages, list) or not messages:
        raise UserError("a conversation is a non-empty list of messages")
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f"message {number} is not {{\"role\": ..., \"content\": \"text\"}}: {str(message)[:80]}")
        if message.get("role") not in ROLES:
            raise UserError(f"message {number} has role {message.get('role')!r}; expected one of {', '.join(ROLES)}")


def render_chat(tokenizer, messages, add_generation_prompt=True) -> str:
    """The conversation as the text the model reads: its template (DEFAULT_CHAT_TEMPLATE for a
    model without one) applied to the messages, then, with add_generation_prompt, the opening of
    the assistant's reply."""
    special = {name: token_text(tokenizer, getattr(tokenizer, f"{name}_id")) for name in ("bos", "eos")}
    return render_messages(tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt,
                           **{f"{name}_token": text for name, text in special.items() if text is not None})


def render_messages(template, messages, add_generation_prompt=True, **special_tokens):
    """A template applied to messages with the variables transformers passes: the messages, the
    flag, the special tokens' texts (bos_token, eos_token) and no tools or documents."""
    import jinja2

    check_messages(messages)
    try:
        return compile_template(template).render(messages=[dict(m) for m in messages],
                                                 add_generation_prompt=add_generation_prompt,
                                                 tools=None, documents=None, **special_tokens)
    except jinja2.TemplateError as e:  # raise_exception() in the template, or a template bug
        raise UserError(f"the chat template cannot render this conversation: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise UserError(f"the chat template failed on this conversation: {type(e).__name__}: {e}") from None


def encode_chat(tokenizer, messages, add_generation_prompt=True) -> list[int]:
    """The rendered conversation's ids: the text encoded with the markers the template wrote
    read as special tokens, and nothing added around it (as apply_chat_template tokenizes)."""
    return tokenizer.encode(render_chat(tokenizer, messages, add_generation_prompt), allow_special=True)


def encode_conversation(tokenizer, messages):
    """(ids, mask) of a whole conversation, for fine-tuning: mask[i] is 1 where ids[i] is a token
    the assistant says, up to and including its end-of-turn marker, and 0 on everything else (the
    system prompt, the user's turns, the template's headers), so the loss teaches only the replies
    and when to stop.

    Each reply's text is found by rendering: the conversation up to the reply with the
    generation prompt ends exactly where the reply begins, and up to and including the reply it
    ends where the reply's turn ends. The ids are those of the whole text (as apply_chat_template
    gives them), and each of those two places maps to the first token that the text before it
    does not already produce (a token that straddles the place is the reply's at its start and
    the template's at its end)."""
    check_messages(messages)
    text = render_chat(tokenizer, messages, add_generation_prompt=False)
    ids = tokenizer.encode(text, allow_special=True)
    mask = [0] * len(ids)

    def token_boundary(prefix):
        if not text.startswith(prefix):
            raise UserError("the chat template writes earlier turns differently once a conversation goes on, "
                            "so the assistant's replies cannot be located in it")
        prefix_ids = tokenizer.encode(prefix, allow_special=True)
        common = 0
        while common < min(len(prefix_ids), len(ids)) and prefix_ids[common] == ids[common]:
            common += 1
        return common

    stop_ids = end_of_turn_ids(tokenizer)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = token_boundary(render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else "")
        end = token_boundary(render_chat(tokenizer, messages[:i + 1], add_generation_prompt=False))
        # the turn ends with its end-of-turn marker: what the template writes after it (ChatML's
        # newline) is the template's, not the reply's
        end = next((j + 1 for j in range(start, end) if ids[j] in stop_ids), end)
        mask[start:end] = [1] * (end - start)
    return ids, mask


def is_instruction_tuned(tokenizer) -> bool:
    """A model that came with its own chat template was taught to chat in it."""
    return bool(tokenizer.chat_template)


def with_chat_template(tokenizer):
    """The tokenizer to teach a model to chat with: its own when it has a template, else the
    same tokenizer with DEFAULT_CHAT_TEMPLATE and its markers as new special tokens (ids after
    the last one, so every existing id keeps its meaning and the embedding only grows)."""
    if is_instruction_tuned(tokenizer):
        return tokenizer
    taught = with_special_tokens(tokenizer, CHAT_MARKERS)
    taught.chat_template = DEFAULT_CHAT_TEMPLATE
    return taught


def end_of_turn_ids(tokenizer) -> set[int]:
    """The ids that end a reply: the end-of-text token, and the marker the template writes right
    after an assistant's message (SmolLM2's <|im_end|>, Llama 3's <|eot_id|>), found by rendering
    a reply and reading the first token after its text."""
    stop = {tokenizer.eos_id} - {None}
    reply = "Hello."
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}]
    try:
        text = render_chat(tokenizer, messages, add_generation_prompt=False)
    except UserError:
        return stop
    after = text[text.rfind(reply) + len(reply):]
    after_ids = tokenizer.encode(after, allow_special=True) if after else []
    if after_ids and after.startswith(tokenizer.decode(after_ids[:1])) and len(tokenizer.decode(after_ids[:1])) > 1:
        stop.add(after_ids[0])  # a marker token, not a plain character such as a newline
    return stop


def end_of_turn_text(tokenizer):
    """The text that ends a reply when the model has no special token for it (a base model
    talking through DEFAULT_CHAT_TEMPLATE reads its markers as ordinary text)."""
    return None if tokenizer.chat_template else CHAT_MARKERS[1]


# ---- a conversation's KV cache --------------------------------------------------------------

def grow_cache(model, cache, length):
    """A cache that holds at least `length` positions (doubling, at most the model's context),
    with what `cache` holds copied in: the cache grows with the conversation instead of
    reserving the whole context (131,072 positions for some real models) up front."""
    if cache is not None and cache.keys.shape[3] >= length:
        return cache
    size = min(model.config.block_size, max(length, 2 * (cache.keys.shape[3] if cache is not None else 256)))
    weight = model.ln_f.weight  # (an 8-bit model's wte.weight would be a float copy of the whole table)
    grown = KVCache(model.config, 1, weight.device, weight.dtype, size)
    if cache is not None:
        grown.keys[:, :, :, :cache.length] = cache.keys[:, :, :, :cache.length]
        grown.values[:, :, :, :cache.length] = cache.values[:, :, :, :cache.length]
        grown.length = cache.length
    return grown


@torch.inference_mode()
def advance(model, cache, cached_ids, ids):
    """Bring a cache that holds `cached_ids` to holding `ids`, computing only the positions after
    the two sequences' common start (a new turn costs only its own tokens; where the template or
    the tokenizer wrote the history differently, from the first difference on). Returns the new
    cache, the logits that follow ids' last token, and how many positions were computed."""
    if not ids or len(ids) > model.config.block_size:
        raise UserError(f"the conversation is {len(ids)} tokens; this model reads 1 to {model.config.block_size}")
    common = 0
    limit = min(len(cached_ids), len(ids) - 1, cache.length if cache is not None else 0)  # >= 1 token to compute
    while common < limit and cached_ids[common] == ids[common]:
        common += 1
    cache = grow_cache(model, cache, len(ids))
    cache.length = common  # what lies beyond is overwritten
    device = model.wte.weight.device
    logits, _ = model(torch.tensor([ids[common:]], device=device), kv_cache=cache)
    return cache, logits[0, -1], len(ids) - common


def fit_context(tokenizer, messages, block_size, reserve):
    """The ids to reply to, with room for `reserve` new tokens in the model's context: while the
    conversation is too long, its oldest exchange (the first message after the system prompt,
    and the reply that answered it) is dropped from `messages` (in place). Returns (ids, number
    of messages dropped); a last message too long to fit even alone is a UserError."""
    dropped = 0
    while True:
        ids = encode_chat(tokenizer, messages)
        if len(ids) + reserve <= block_size:
            return ids, dropped
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise UserError(f"the message is {len(ids)} tokens with the template; with {reserve} for the reply it "
                            f"does not fit in the model's context of {block_size}")
        del messages[first]
        dropped += 1
        if len(messages) - first > 1 and messages[first]["role"] == "assistant":
            del messages[first]
            dropped += 1


def grow_vocabulary(model, vocab_size):
    """Give `model` embedding (and output) rows for ids up to vocab_size, in place: the rows of
    new special tokens (the default template's markers). Each new row starts as the mean of the
    trained rows, a token like the average one, so the first steps' loss is that of the model
    as it was; fine-tuning then teaches the rows what the markers mean."""
    import dataclasses

    from model.gpt import Linear

    old_size = model.config.vocab_size
    if vocab_size <= old_size:
        return model
    config = dataclasses.replace(model.config, vocab_size=vocab_size)

    def grown(weight):
        rows = torch.zeros(config.padded_vocab_size, weight.shape[1], dtype=weight.dtype, device=weight.device)
        rows[:old_size] = weight[:old_size]
        rows[old_size:vocab_size] = weight[:old_size].mean(0)
        return torch.nn.Parameter(rows)

    with torch.no_grad():
        model.wte = torch.nn.Embedding(config.padded_vocab_size, config.n_embd, _weight=grown(model.wte.weight))
        if config.tie_embeddings:
            model.lm_head.weight = model.wte.weight
        else:
            head = Linear(config.n_embd, config.padded_vocab_size, bias=False)
            head.weight = grown(model.lm_head.weight)
            model.lm_head = head
    model.config = config
    return model
