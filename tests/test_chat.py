"""Chat: templates rendered as transformers renders them, the loss mask of the assistant's tokens,
a conversation's KV cache, chat.py's three modes, and fine-tuning on conversations.

The outside reference is transformers: its apply_chat_template (text, ids and, for a template that
marks the replies with {% generation %}, its assistant mask) and its greedy generate, on tiny
tokenizers and a tiny random Llama built here. Nothing is downloaded.
"""

import json
import os

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, run_script
from data.loader import IGNORE, BatchLoader
from model.chat import (CHAT_MARKERS, DEFAULT_CHAT_TEMPLATE, advance, encode_chat, encode_conversation,
                        end_of_turn_ids, fit_context, is_instruction_tuned, render_chat, with_chat_template)
from model.checkpoint import load_checkpoint
from model.errors import UserError
from model.hf import load_hf_model
from model.tokenizer import char_tokenizer_from_text, hf_tokenizer, tokenizer_from_dict, train_bpe

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

SMOLLM2 = (  # SmolLM2-Instruct's own template, verbatim: it adds a system prompt when there is none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = (  # Meta-Llama-3-8B-Instruct's
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = (  # Gemma's: no system role, and roles must alternate
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
CHATML_MARKED = (  # ChatML with transformers' {% generation %} marks around what the assistant says
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATES = {  # name -> (template, special tokens: the first is bos, the second eos)
    "smollm2": (SMOLLM2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>"),
    "gemma": (GEMMA, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>"),
    "chatml_marked": (CHATML_MARKED, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>"),
}
TEXT = ("What is the capital of France? The capital of France is Paris. And of Italy? Rome, of course.\n"
        "def add(a, b):\n    return a + b\n  Ünïcödé and  spaces\t\n") * 20
CONVERSATION = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "  And of Italy?\n"},
    {"role": "assistant", "content": "Rome, of course.\n"},
]


def build_tokenizer_folder(folder, name):
    template, specials, bos, eos = TEMPLATES[name]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos)
    theirs.chat_template = template
    theirs.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_tokenizers")
    return {name: build_tokenizer_folder(str(root / name), name) for name in TEMPLATES}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama with SmolLM2's template and special tokens, as a Hugging Face folder."""
    folder = build_tokenizer_folder(str(tmp_path_factory.mktemp("chat_model")), "smollm2")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def conversation_for(name):
    return CONVERSATION[1:] if name == "gemma" else CONVERSATION


# ---- the template ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["smollm2", "llama3", "gemma"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_and_ids_equal_transformers_apply_chat_template(tokenizer_folders, name, add_generation_prompt):
    ours = hf_tokenizer(tokenizer_folders[name])
    theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_folders[name])
    for messages in (conversation_for(name)[:2] if name != "gemma" else conversation_for(name)[:1],
                     conversation_for(name)):
        if add_generation_prompt and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        expected_text = theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        expected_ids = theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, return_dict=False)
        assert render_chat(ours, messages, add_generation_prompt) == expected_text
        assert encode_chat(ours, messages, add_generation_prompt) == expected_ids
    assert is_instruction_tuned(ours)


def test_a_template_that_refuses_a_conversation_is_one_clear_error(tokenizer_folders):
    gemma = hf_tokenizer(tokenizer_folders["gemma"])
    with pytest.raises(UserError, match="System role not supported"):
        render_chat(gemma, CONVERSATION)
    with pytest.raises(UserError, match="role 'robot'"):
        render_chat(gemma, [{"role": "robot", "content": "beep"}])
    broken = hf_tokenizer(tokenizer_folders["smollm2"])
    broken.chat_template = "{% for m in messages %}{{ m['content'] }"
    with pytest.raises(UserError, match="not valid Jinja"):
        render_chat(broken, CONVERSATION)


def test_the_sandbox_keeps_a_template_away_from_python_internals(tokenizer_folders):
    tokenizer = hf_tokenizer(tokenizer_folders["smollm2"])
    tokenizer.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(UserError):
        render_chat(tokenizer, CONVERSATION)


def test_the_mask_equals_transformers_assistant_mask(tokenizer_folders):
    ours = hf_tokenizer(tokenizer_folders["chatml_marked"])
    theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_folders["chatml_marked"])
    expected = theirs.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encode_conversation(ours, CONVERSATION)
    assert ids == expected["input_ids"]
    assert mask == expected["assistant_masks"] and sum(mask) > 0


@pytest.mark.parametrize("name", ["smollm2", "llama3", "gemma"])
def test_the_mask_covers_exactly_each_reply_and_its_end_of_turn_marker(tokenizer_folders, name):
    tokenizer = hf_tokenizer(tokenizer_folders[name])
    messages = conversation_for(name)
    ids, mask = encode_conversation(tokenizer, messages)
    assert ids == encode_chat(tokenizer, messages, add_generation_prompt=False)
    runs, current = [], []
    for token, trained in zip(ids + [None], mask + [0]):
        if trained:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    end = {"smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}[name]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if name != "smollm2":  # these templates trim each message
        replies = [r.strip() for r in replies]
    assert runs == [reply + end for reply in replies]
    assert tokenizer.encode(end, allow_special=True)[0] in end_of_turn_ids(tokenizer)


def test_every_tokenizer_kind_takes_the_default_templates_markers_as_new_ids(tokenizer_folders):
    kinds = {"char": char_tokenizer_from_text(TEXT + json.dumps(CONVERSATION) + "usersystemassistant\n"), "bpe": train_bpe([TEXT], 300),
             "hf": hf_tokenizer(tokenizer_folders["smollm2"])}
    kinds["hf"].chat_template = None  # as a base model's
    for kind, tokenizer in kinds.items():
        assert not is_instruction_tuned(tokenizer)
        taught = with_chat_template(tokenizer)
        assert taught.chat_template == DEFAULT_CHAT_TEMPLATE and tokenizer.chat_template is None
        new_ids = [taught.encode(marker, allow_special=True) for marker in CHAT_MARKERS]
        if kind == "hf":  # SmolLM2's tokenizer has these markers already: they keep their ids
            assert new_ids == [[1], [2]] and taught.vocab_size == tokenizer.vocab_size
        else:
            assert new_ids == [[tokenizer.vocab_size], [tokenizer.vocab_size + 1]], kind
            assert taught.vocab_size == tokenizer.vocab_size + 2
        assert taught.encode(TEXT[:200]) == tokenizer.encode(TEXT[:200])  # every old id keeps its meaning
        if kind != "char":  # (a character vocabulary has no '<' to spell it with)
            assert taught.encode(CHAT_MARKERS[0]) != new_ids[0]  # typed as text, a marker stays text
        rebuilt = tokenizer_from_dict(json.loads(json.dumps(taught.to_dict())))
        assert rebuilt.to_dict() == taught.to_dict() and rebuilt.chat_template == DEFAULT_CHAT_TEMPLATE
        ids, mask = encode_conversation(taught, CONVERSATION)
        assert taught.decode([i for i, m in zip(ids, mask) if m]).endswith("Rome, of course.\n<|im_end|>")


# ---- a conversation's KV cache ------------------------------------------------------------------

def test_a_new_turn_with_the_kept_cache_equals_a_full_recompute(chat_model):
    model, tokenizer = load_hf_model(chat_model)
    model.eval()
    first = encode_chat(tokenizer, CONVERSATION[:2])
    cache, _, computed = advance(model, None, [], first)
    assert computed == len(first)
    # the reply, as the model would have written it, then the next user turn
    cached = first + tokenizer.encode(CONVERSATION[2]["content"])
    cache, _, _ = advance(model, cache, first, cached)
    second = encode_chat(tokenizer, CONVERSATION[:4])
    cache, logits, computed = advance(model, cache, cached, second)
    assert computed == len(second) - len(cached)  # only the new turn's tokens
    with torch.no_grad():
        full = model(torch.tensor([second]))[0][0, -1]
    assert torch.allclose(logits, full, atol=1e-4), (logits - full).abs().max()
    # a history written differently (an edited first turn) is recomputed from the first difference
    edited = encode_chat(tokenizer, [CONVERSATION[0], {"role": "user", "content": "What about Spain?"}])
    cache, logits, computed = advance(model, cache, second, edited)
    with torch.no_grad():
        assert torch.allclose(logits, model(torch.tensor([edited]))[0][0, -1], atol=1e-4)
    assert computed < len(edited)  # the system prompt was kept


def test_the_oldest_turns_are_dropped_when_the_context_is_full(tokenizer_folders):
    tokenizer = hf_tokenizer(tokenizer_folders["smollm2"])
    messages = [dict(m) for m in CONVERSATION] + [{"role": "user", "content": "And Spain?"}]
    full = len(encode_chat(tokenizer, messages))
    ids, dropped = fit_context(tokenizer, messages, block_size=full + 10, reserve=10)
    assert dropped == 0 and len(ids) == full
    ids, dropped = fit_context(tokenizer, messages, block_size=full, reserve=10)
    assert dropped == 2 and messages[0] == CONVERSATION[0] and messages[1] == CONVERSATION[3]
    assert len(ids) + 10 <= full
    with pytest.raises(UserError, match="does not fit"):
        fit_context(tokenizer, messages, block_size=20, reserve=10)


# ---- chat.py ----------------------------------------------------------------------------------

def their_reply(folder, messages, max_new_tokens):
    """transformers' greedy reply to messages, through its own apply_chat_template."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[:new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new)


def test_one_shot_prints_only_the_reply_transformers_gives(chat_model):
    result = run_script("chat.py", f"--init_from=hf:{chat_model}", "--prompt=What is the capital of France?",
                        "--temperature=0", "--max_new_tokens=12", "--device=cpu")
    reply = their_reply(chat_model, [{"role": "user", "content": "What is the capital of France?"}], 12)
    assert result.stdout == reply + "\n"
    assert "tokens/s" in result.stderr


def test_piped_lines_are_turns_of_one_conversation_each_reading_only_its_own_tokens(chat_model):
    lines = "What is the capital of France?\nAnd of Italy?\n/show\n/reset\nAnd of Italy?\n"
    result = run_script("chat.py", f"--init_from=hf:{chat_model}", "--system=Answer in one sentence.",
                        "--temperature=0", "--max_new_tokens=8", "--device=cpu", input=lines)
    first, second, after_reset = result.stdout.split("\n")[:3]
    messages = [{"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": "What is the capital of France?"}]
    assert first == their_reply(chat_model, messages, 8)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
    assert second == their_reply(chat_model, messages, 8)
    assert after_reset == their_reply(chat_model, [messages[0], messages[-1]], 8)
    read = [int(part.split("read ")[1].split()[0]) for part in result.stderr.splitlines() if "read " in part]
    total = [int(part.split(" of ")[1].split()[0]) for part in result.stderr.splitlines() if "read " in part]
    assert read[0] == total[0] and read[1] <= total[1] - total[0]  # turn two: its own tokens, not the history
    assert "<|im_start|>system\nAnswer in one sentence.<|im_end|>" in result.stderr  # /show
    assert "tokens; " in result.stderr and "left]" in result.stderr


def test_a_model_without_a_template_is_told_then_taught_the_default_one(tmp_path):
    """A model trained here: chat.py still talks to it; chat data gives it ChatML's markers as two
    new embedding rows; full fine-tuning trains them (LoRA is refused); export writes the template."""
    corpus = tmp_path / "text.txt"
    corpus.write_text(TEXT * 3)
    data_root, base, taught = tmp_path / "data", tmp_path / "base", tmp_path / "taught"
    run_script("data/prepare.py", "text", f"--input={corpus}", "--tokenizer=bpe", "--vocab_size=300",
               f"--data_root={data_root}")
    tiny = ["--block_size=96", "--batch_size=4", "--eval_iters=1", "--sample_tokens=0", "--plot=false", "--device=cpu"]
    run_script("train.py", "--dataset=text", f"--data_root={data_root}", f"--out_dir={base}", "--n_layer=1",
               "--n_head=2", "--n_embd=32", "--max_iters=2", *tiny)
    result = run_script("chat.py", f"--out_dir={base}", "--prompt=Hi", "--max_new_tokens=5", "--device=cpu")
    assert "not instruction-tuned" in result.stderr and result.stdout.endswith("\n")

    write_conversations(tmp_path / "sums.jsonl")
    result = run_script("data/prepare.py", "sums", f"--input={tmp_path / 'sums.jsonl'}", f"--tokenizer={base}",
                        f"--data_root={data_root}")
    assert "its markers as 2 new ids" in result.stderr
    common = [f"--init_from={base / 'ckpt.pt'}", "--dataset=sums", f"--data_root={data_root}", "--max_iters=2", *tiny]
    assert_clean_error(run_script("train.py", *common, "--lora_rank=4", f"--out_dir={taught}", check=False))
    result = run_script("train.py", *common, f"--out_dir={taught}")
    assert "2 new embedding rows" in result.stderr
    checkpoint = load_checkpoint(taught)
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
    assert checkpoint["model_config"]["vocab_size"] == tokenizer.vocab_size == 302
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert "not instruction-tuned" not in run_script("chat.py", f"--out_dir={taught}", "--prompt=Hi",
                                                     "--max_new_tokens=3", "--device=cpu").stderr
    run_script("export.py", f"--out_dir={taught}", "--format=hf", f"--output={tmp_path / 'hf'}")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False) == \
        encode_chat(tokenizer, CONVERSATION, add_generation_prompt=False)


def test_bad_input_is_one_error_line(chat_model, tmp_path, tokenizer_folders):
    model = f"--init_from=hf:{chat_model}"
    assert_clean_error(run_script("chat.py", "--init_from=hf:" + str(tmp_path / "nothing"), "--prompt=hi",
                                  check=False))
    assert_clean_error(run_script("chat.py", model, "--prompt=  ", check=False))
    assert_clean_error(run_script("chat.py", model, f"--prompt=FILE:{tmp_path / 'missing.txt'}", check=False))
    assert_clean_error(run_script("chat.py", model, "--temperature=-1", "--prompt=hi", check=False))
    # a template that refuses the conversation (Gemma's has no system role)
    gemma = tmp_path / "gemma"
    import shutil

    shutil.copytree(chat_model, gemma)
    (gemma / "chat_template.jinja").write_text(GEMMA)
    result = run_script("chat.py", f"--init_from=hf:{gemma}", "--system=Be brief.", "--prompt=hi", check=False)
    assert_clean_error(result)
    assert "System role not supported" in result.stderr


# ---- fine-tuning on conversations -------------------------------------------------------------

def write_conversations(path, count=20):
    rows = []
    for i in range(count):
        a, b = i % 7, (3 * i) % 5
        if i % 4 == 3:
            rows.append({"instruction": f"Add {a} and {b}.", "input": "Digits only.", "output": f"{a + b}"})
        else:
            rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                      {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


@pytest.fixture(scope="module")
def chat_data(chat_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_data")
    rows = write_conversations(root / "sums.jsonl")
    result = run_script("data/prepare.py", "sums", f"--input={root / 'sums.jsonl'}", f"--tokenizer=hf:{chat_model}",
                        f"--data_root={root / 'data'}")
    return root, rows, result


def test_prepare_writes_tokens_a_mask_and_conversation_starts_split_by_conversation(chat_data, chat_model):
    root, rows, result = chat_data
    data_dir = root / "data" / "sums"
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["mask"] and meta["split_by"] == "conversations"
    assert (meta["train_conversations"], meta["val_conversations"]) == (18, 2)  # every 10th validates
    tokenizer = hf_tokenizer(chat_model)
    expected = []
    for i, row in enumerate(rows):
        messages = row.get("messages") or [{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"},
                                           {"role": "assistant", "content": row["output"]}]
        expected.append(encode_conversation(tokenizer, messages))
    for split, chosen in (("train", [e for i, e in enumerate(expected) if i % 10 != 9]),
                          ("val", [e for i, e in enumerate(expected) if i % 10 == 9])):
        ids = np.fromfile(data_dir / f"{split}.bin", dtype=meta["dtype"]).tolist()
        mask = np.fromfile(data_dir / f"{split}_mask.bin", dtype=np.uint8).tolist()
        starts = np.fromfile(data_dir / f"{split}_starts.bin", dtype=np.int64).tolist()
        assert ids == [i for c, _ in chosen for i in c] and mask == [m for _, c in chosen for m in c]
        assert starts == list(np.cumsum([0] + [len(c) for c, _ in chosen][:-1]))
        assert meta[f"{split}_trained_tokens"] == sum(mask)
    assert "\u27e6What is 0 plus 0 is 0.<|im_end|>\u27e7" not in result.stderr  # (the reply is marked, not the question)
    assert "\u27e60 plus 0 is 0.<|im_end|>\u27e7" in result.stderr
    assert "18 conversations" in result.stderr and "trained" in result.stderr


def test_a_malformed_row_names_its_line_and_keeps_the_prepared_set(chat_data, chat_model, tmp_path):
    root, _, _ = chat_data
    data_dir = root / "data" / "sums"
    before = (data_dir / "train.bin").read_bytes()
    for bad in ['{"messages": [{"role": "user", "content": "hi"}]}', '{"messages": [{"role": "pilot", "content": "x"}]}',
                "not json", '{"text": "plain"}']:
        source = tmp_path / "bad.jsonl"
        source.write_text((root / "sums.jsonl").read_text() + "\n" + bad + "\n")
        result = run_script("data/prepare.py", "sums", f"--input={source}", f"--tokenizer=hf:{chat_model}",
                            f"--data_root={root / 'data'}", check=False)
        assert_clean_error(result)
        assert "line 22" in result.stderr, result.stderr
    assert (data_dir / "train.bin").read_bytes() == before


BLOCK = 128


def test_the_masked_loss_is_the_mean_over_the_assistants_tokens(chat_data, chat_model):
    root, _, _ = chat_data
    data_dir = root / "data" / "sums"
    with pytest.raises(UserError, match="no reply token within block_size = 16"):  # SmolLM2's system prompt is longer
        BatchLoader(data_dir, "train", batch_size=4, block_size=16, seed=0)
    loader = BatchLoader(data_dir, "train", batch_size=4, block_size=BLOCK, seed=0)
    offsets = loader._offsets([0, 0, 0], 4)  # the windows of step 0
    x, y = loader.next_batch()
    tokens = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
    mask = np.fromfile(data_dir / "train_mask.bin", dtype=np.uint8)
    starts = np.fromfile(data_dir / "train_starts.bin", dtype=np.int64)
    for row, offset in enumerate(offsets):  # each window starts at a conversation; y keeps only replies
        assert offset in starts
        window = tokens[offset:offset + BLOCK + 1]
        assert np.array_equal(x[row, :len(window)].numpy(), window[:BLOCK])
        trained = np.zeros(BLOCK, dtype=bool)
        trained[:len(window) - 1] = mask[offset + 1:offset + BLOCK + 1] == 1
        assert np.array_equal((y[row] != IGNORE).numpy(), trained)
    model, _ = load_hf_model(chat_model)
    with torch.no_grad():
        logits, loss = model(x, y)
    log_probs = logits.log_softmax(-1)
    by_hand = [-log_probs[b, t, y[b, t]] for b in range(4) for t in range(BLOCK) if y[b, t] != IGNORE]
    assert 0 < len(by_hand) < 4 * BLOCK
    assert torch.allclose(loss, torch.stack(by_hand).mean(), atol=1e-5)


def test_full_and_lora_fine_tuning_on_conversations_learn_and_resume_exactly(chat_data, chat_model, tmp_path):
    root, _, _ = chat_data
    common = [f"--init_from=hf:{chat_model}", "--dataset=sums", f"--data_root={root / 'data'}", "--block_size=128",
              "--batch_size=4", "--eval_iters=2", "--eval_interval=6", "--log_interval=1", "--sample_tokens=0",
              "--plot=false", "--device=cpu", "--learning_rate=3e-3", "--warmup_iters=0"]
    for kind in ([], ["--lora_rank=4"]):
        straight, split = tmp_path / f"straight{len(kind)}", tmp_path / f"split{len(kind)}"
        result = run_script("train.py", *common, *kind, "--max_iters=6", f"--out_dir={straight}")
        assert "val loss (assistant tokens)" in result.stderr and "assistant tokens only" in result.stderr
        log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
        evals = [r["val_loss"] for r in log if "val_loss" in r]
        assert evals[-1] < evals[0]
        run_script("train.py", *common, *kind, "--max_iters=3", "--lr_decay_iters=6", f"--out_dir={split}")
        run_script("train.py", "--init_from=resume", "--max_iters=6", f"--out_dir={split}")
        a, b = load_checkpoint(straight), load_checkpoint(split)
        for name in a["model"]:
            assert torch.equal(a["model"][name], b["model"][name]), name
