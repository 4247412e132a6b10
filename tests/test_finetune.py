"""Fine-tuning as a new user does it: prepare one's own text with a model's tokenizer, then
train from that model. prepare.py reuses the tokenizer of a checkpoint, an out_dir or a Hugging
Face folder, and says which tokenizer it chose; train.py refuses a data set tokenized otherwise
and names the exact command that fixes it."""

import json
import shlex

from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE

from conftest import TINY_MODEL, assert_clean_error, learnable_corpus, run_script
from model.tokenizer import load_tokenizer

NOTES = "".join(f"note {i}: buy milk, call bob, water the plants.\n" for i in range(300))


def test_fine_tune_our_checkpoint_on_new_text_with_the_command_train_py_names(tmp_path):
    corpus, notes, data_root, out = tmp_path / "corpus.txt", tmp_path / "notes.txt", tmp_path / "data", tmp_path / "out"
    corpus.write_text(learnable_corpus(n_chars=20_000) + NOTES)
    notes.write_text(NOTES)
    run_script("data/prepare.py", "base", f"--input={corpus}", "--tokenizer=bpe", "--vocab_size=300",
               f"--data_root={data_root}")
    run_script("train.py", *TINY_MODEL, f"--data_root={data_root}", "--dataset=base", f"--out_dir={out}",
               "--max_iters=20", "--eval_interval=20", "--plot=false")

    # a new name with no --tokenizer: char, and prepare says so and how to pick the model's instead
    result = run_script("data/prepare.py", "notes", f"--input={notes}", f"--data_root={data_root}")
    assert "tokenizer: char" in result.stderr and "--tokenizer=OUT_DIR" in result.stderr
    fine_tune = ["train.py", *TINY_MODEL, f"--init_from={out / 'ckpt.pt'}", f"--data_root={data_root}",
                 "--dataset=notes", f"--out_dir={tmp_path / 'out-notes'}", "--max_iters=30", "--eval_interval=15",
                 "--learning_rate=3e-3", "--plot=false"]
    refused = run_script(*fine_tune, check=False)
    assert_clean_error(refused)
    command = refused.stderr.split("prepare it with the model's: ")[1].strip()
    assert command == (f"python data/prepare.py notes --input={notes} --tokenizer={out / 'ckpt.pt'} "
                       f"--data_root={data_root}")

    prepared = run_script(*shlex.split(command)[1:])  # exactly as printed (after "python")
    assert f"tokenizer: bpe with 300 ids, the tokenizer of the model in {out / 'ckpt.pt'}" in prepared.stderr
    assert load_tokenizer(data_root / "notes" / "tokenizer.json").to_dict() == \
        load_tokenizer(data_root / "base" / "tokenizer.json").to_dict()
    run_script(*fine_tune)
    losses = [r["val_loss"] for r in map(json.loads, (tmp_path / "out-notes" / "log.jsonl").read_text().splitlines())
              if "val_loss" in r]
    assert losses[-1] < losses[0]

    # an out_dir works as well as the ckpt.pt in it
    again = run_script("data/prepare.py", "notes2", f"--input={notes}", f"--tokenizer={out}", f"--data_root={data_root}")
    assert "the tokenizer of the model in" in again.stderr
    assert (data_root / "notes2" / "tokenizer.json").read_text() == (data_root / "notes" / "tokenizer.json").read_text()


def test_prepare_takes_a_hugging_face_tokenizer_from_a_local_folder(tmp_path):
    folder = tmp_path / "hf-model"
    folder.mkdir()
    tok = Tokenizer(BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([NOTES], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    (tmp_path / "notes.txt").write_text(NOTES)
    result = run_script("data/prepare.py", "notes", f"--input={tmp_path / 'notes.txt'}", f"--tokenizer=hf:{folder}",
                        f"--data_root={tmp_path / 'data'}")
    assert f"tokenizer: hf with 300 ids, the tokenizer of hf:{folder}" in result.stderr
    meta = json.loads((tmp_path / "data" / "notes" / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eos_id"]) == ("hf", 300, 0)
    assert load_tokenizer(tmp_path / "data" / "notes" / "tokenizer.json").encode("note 7: buy milk") == \
        tok.encode("note 7: buy milk").ids


def test_an_unknown_tokenizer_or_a_missing_checkpoint_is_one_error_line(tmp_path):
    (tmp_path / "notes.txt").write_text(NOTES)
    for spec in ("bogus", str(tmp_path / "no-such-out"), str(tmp_path), f"hf:{tmp_path / 'nothing-here'}"):
        result = run_script("data/prepare.py", "notes", f"--input={tmp_path / 'notes.txt'}", f"--tokenizer={spec}",
                            f"--data_root={tmp_path / 'data'}", check=False)
        assert_clean_error(result)
    assert not (tmp_path / "data" / "notes").exists()


def test_fine_tune_a_hugging_face_model_as_the_gpt2_recipe_does_offline(tmp_path):
    """The README's GPT-2 recipe with a tiny GPT-2 in a local folder in place of the hub's."""
    import torch

    from model.gpt import GPT, GPTConfig
    from model.hf import save_hf_model
    from model.tokenizer import HFTokenizer

    tok = Tokenizer(BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([NOTES], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch="gpt2", vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=32))
    folder, notes, data_root = tmp_path / "tiny-gpt2", tmp_path / "notes.txt", tmp_path / "data"
    save_hf_model(model, HFTokenizer(tok.to_str(), None, 0), str(folder))
    notes.write_text(NOTES)

    run_script("data/prepare.py", "notes", f"--input={notes}", f"--data_root={data_root}")  # char: refused below
    fine_tune = ["train.py", f"--init_from=hf:{folder}", "--dataset=notes", f"--data_root={data_root}",
                 f"--out_dir={tmp_path / 'out-notes'}", "--max_iters=30", "--eval_interval=15", "--batch_size=8",
                 "--block_size=32", "--eval_iters=2", "--log_interval=5", "--sample_tokens=0", "--device=cpu",
                 "--learning_rate=3e-3", "--plot=false"]
    refused = run_script(*fine_tune, check=False)
    assert_clean_error(refused)
    command = refused.stderr.split("prepare it with the model's: ")[1].strip()
    assert command == f"python data/prepare.py notes --input={notes} --tokenizer=hf:{folder} --data_root={data_root}"
    run_script(*shlex.split(command)[1:])
    run_script(*fine_tune)
    losses = [r["val_loss"] for r in map(json.loads, (tmp_path / "out-notes" / "log.jsonl").read_text().splitlines())
              if "val_loss" in r]
    assert losses[-1] < losses[0]
