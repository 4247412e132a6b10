import json
import random

import numpy as np
import pytest
import tiktoken.load

from model.errors import UserError
from model.tokenizer import (
    EOT,
    char_tokenizer_from_text,
    gpt2_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_dict,
    train_bpe,
)

# A small corpus written here, so the tests need no downloaded data.
CORPUS = [
    '''def greet(name):
    """Say hello to someone."""
    if not name:
        raise ValueError("name must not be empty")
    return f"Hello, {name}!"


class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, step=1):
        self.count += step
        return self.count
''',
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.\n" * 5,
    "Naïve café résumé — déjà vu. 東京は日本の首都です。 Привет, мир! 🙂👍🏽\r\n\tTabs\tand  spaces   here.\n",
]

TRICKY_TEXTS = [
    "",
    "Hello world",
    "emoji: 🙂 👩‍👩‍👧 🇫🇷 👍🏽",
    "CJK: 東京は日本の首都です。한국어 텍스트",
    "code:\n\tdef f(x):\r\n\t\treturn x ** 2  # square\n",
    "whitespace runs:      \n\n\n\t\t  \r\n  \u00a0\u3000 end  ",
    "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353",
    "control and odd: \x00\x01\x7f \ufeff \u200b \U0010ffff",
    f"a document{EOT}another",
]


def random_texts(count=200, seed=1234):
    """Random strings drawn from many parts of Unicode (all code points except surrogates,
    which are not valid UTF-8), with extra weight on the characters that trip tokenizers."""
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0x00, 0x20), (0x80, 0x2FF), (0x300, 0x36F), (0x4E00, 0x9FFF),
              (0x1F300, 0x1FAFF), (0xE000, 0x10FFFF)]
    whitespace = " \t\n\r\x0b\x0c\u00a0\u2028\u3000"
    texts = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(0, 40)):
            if rng.random() < 0.2:
                chars.append(rng.choice(whitespace))
            else:
                low, high = rng.choice(ranges)
                chars.append(chr(rng.randint(low, high)))
        texts.append("".join(chars))
    return texts


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory, bpe):
    """A GPT-2-format .tiktoken file (base64 token, rank per line), holding our small BPE's ranks."""
    path = tmp_path_factory.mktemp("tok") / "small.tiktoken"
    path.write_text(bpe.to_dict()["ranks"])
    return path


# --- char -----------------------------------------------------------------------------


def test_char_vocabulary_is_the_sorted_set_of_characters():
    tok = char_tokenizer_from_text("hello, world")
    assert tok.kind == "char" and tok.eos_id is None
    assert tok.chars == sorted(set("hello, world"))
    assert tok.vocab_size == len(set("hello, world"))
    assert tok.encode("hello") == [tok.chars.index(c) for c in "hello"]


def test_char_round_trips_text_of_its_vocabulary():
    text = "".join(CORPUS)
    tok = char_tokenizer_from_text(text)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode()
    assert tok.token_bytes(tok.encode("é")[0]) == "é".encode()


def test_char_unseen_character_is_a_clear_error():
    tok = char_tokenizer_from_text("abc")
    with pytest.raises(UserError, match=r"'z' \(U\+007A\)"):
        tok.encode("abz")
    with pytest.raises(UserError, match=r"U\+1F642"):
        tok.encode("🙂")


def test_char_empty_text_is_refused():
    with pytest.raises(UserError):
        char_tokenizer_from_text("")


# --- bpe ------------------------------------------------------------------------------


def test_bpe_vocab_size_is_exact_and_eot_is_the_last_id(bpe):
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 400
    assert bpe.eos_id == 399
    assert bpe.token_bytes(399) == EOT.encode()
    # the 256 single bytes come first, rank = byte value
    assert [bpe.token_bytes(i) for i in range(256)] == [bytes([b]) for b in range(256)]
    assert len({bpe.token_bytes(i) for i in range(400)}) == 400


def test_bpe_round_trips_emoji_cjk_code_and_whitespace(bpe):
    for text in TRICKY_TEXTS + CORPUS:
        ids = bpe.encode(text)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text
        assert bpe.decode_bytes(ids) == text.encode()
        assert b"".join(bpe.token_bytes(i) for i in ids) == text.encode()


def test_bpe_round_trips_random_unicode(bpe):
    for text in random_texts():
        assert bpe.decode(bpe.encode(text)) == text, repr(text)


def test_bpe_learns_to_compress_its_training_text(bpe):
    text = "".join(CORPUS)
    assert len(bpe.encode(text)) < len(text.encode()) / 2


def test_bpe_training_is_deterministic():
    first = train_bpe(CORPUS, vocab_size=350)
    second = train_bpe(list(CORPUS), vocab_size=350)
    assert first.ranks == second.ranks
    assert first.to_dict() == second.to_dict()


def test_bpe_first_merges_on_a_handmade_corpus():
    # "aaab" chunks: (a,a) occurs twice per chunk, so it merges first. Then (aa,a) and
    # (a,b) tie; the tie goes to the smaller pair of ids, (97, 98) = "ab". Then "aaab",
    # then " aaab" (every chunk after the first starts with a space).
    tok = train_bpe(["aaab " * 50], vocab_size=256 + 4 + 1)
    assert [tok.token_bytes(i) for i in range(256, 260)] == [b"aa", b"ab", b"aaab", b" aaab"]
    assert tok.encode(" aaab") == [259]


def test_bpe_stops_early_when_the_corpus_has_no_more_pairs():
    tok = train_bpe(["ab"], vocab_size=1000)
    assert tok.vocab_size == 258  # 256 bytes + "ab" + <|endoftext|>
    assert tok.eos_id == 257 and tok.token_bytes(256) == b"ab"


def test_bpe_vocab_size_below_bytes_plus_eot_is_refused():
    with pytest.raises(UserError, match="257"):
        train_bpe(CORPUS, vocab_size=256)


def test_eot_in_user_text_is_ordinary_text_but_one_token_on_the_special_path(bpe):
    text = f"first{EOT}second"
    ordinary = bpe.encode(text)
    assert bpe.eos_id not in ordinary
    assert bpe.decode(ordinary) == text
    special = bpe.encode(text, allow_special=True)
    assert special.count(bpe.eos_id) == 1
    assert special == bpe.encode("first") + [bpe.eos_id] + bpe.encode("second")
    assert bpe.decode(special) == text


def test_encode_batch_matches_encode(bpe):
    texts = TRICKY_TEXTS + CORPUS
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]
    char = char_tokenizer_from_text("".join(CORPUS))
    assert char.encode_batch(CORPUS) == [char.encode(t) for t in CORPUS]


def test_decoding_an_id_outside_the_vocabulary_is_a_clear_error(bpe):
    with pytest.raises(UserError, match="outside"):
        bpe.decode([1, bpe.vocab_size])
    with pytest.raises(UserError, match="outside"):
        char_tokenizer_from_text("abc").decode([3])


def test_decode_accepts_numpy_ids(bpe):
    ids = bpe.encode("Hello world")
    assert bpe.decode(np.array(ids, dtype=np.uint16)) == "Hello world"


# --- gpt2 (a tiktoken-format file; GPT-2's real file is not needed) ---------------------


def test_gpt2_tokenizer_loads_a_tiktoken_file_and_round_trips(gpt2_file, bpe):
    tok = gpt2_tokenizer(str(gpt2_file))
    assert tok.kind == "gpt2"
    assert tok.vocab_size == bpe.vocab_size and tok.eos_id == bpe.eos_id
    for text in TRICKY_TEXTS + random_texts(50, seed=7):
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode(text) == bpe.encode(text)
    assert tok.encode(EOT, allow_special=True) == [tok.eos_id]


def test_gpt2_file_reads_the_same_ranks_as_tiktokens_loader(gpt2_file, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's loader would otherwise cache a copy
    assert gpt2_tokenizer(str(gpt2_file)).ranks == tiktoken.load.load_tiktoken_bpe(str(gpt2_file))
    # the format: base64 of the token's bytes, a space, the rank
    assert gpt2_file.read_text().splitlines()[97] == "YQ== 97"  # the byte "a"


def test_missing_or_corrupt_gpt2_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        gpt2_tokenizer(str(tmp_path / "nope.tiktoken"))
    corrupt = tmp_path / "corrupt.tiktoken"
    corrupt.write_text("this is not base64!! 0\n")
    with pytest.raises(UserError, match="not a tiktoken ranks file"):
        gpt2_tokenizer(str(corrupt))
    too_few = tmp_path / "few.tiktoken"
    too_few.write_text("YQ== 0\nYg== 1\n")  # only "a" and "b": not every byte
    with pytest.raises(UserError, match="256 single bytes"):
        gpt2_tokenizer(str(too_few))


def test_gpt2_without_network_says_to_pass_a_tokenizer_file(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    # (the module itself: model/tokenizer.py imports tiktoken only when a tokenizer needs it)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="--tokenizer_file=path/to/gpt2.tiktoken"):
        gpt2_tokenizer()


# --- saving and loading -----------------------------------------------------------------


@pytest.fixture(scope="module")
def all_kinds(bpe, gpt2_file):
    return [char_tokenizer_from_text("".join(CORPUS)), bpe, gpt2_tokenizer(str(gpt2_file))]


def assert_same_tokenizer(a, b):
    assert (a.kind, a.vocab_size, a.eos_id) == (b.kind, b.vocab_size, b.eos_id)
    assert [a.token_bytes(i) for i in range(a.vocab_size)] == [b.token_bytes(i) for i in range(b.vocab_size)]
    text = "".join(CORPUS)
    assert a.encode(text) == b.encode(text)
    assert b.decode(b.encode(text)) == text


def test_to_dict_is_json_and_rebuilds_the_same_tokenizer(all_kinds):
    for tok in all_kinds:
        d = json.loads(json.dumps(tok.to_dict()))
        assert_same_tokenizer(tok, tokenizer_from_dict(d))


def test_save_and_load_give_the_same_tokenizer(all_kinds, tmp_path):
    for tok in all_kinds:
        path = tmp_path / f"{tok.kind}.json"
        save_tokenizer(tok, str(path))
        assert_same_tokenizer(tok, load_tokenizer(str(path)))


def test_missing_or_corrupt_tokenizer_json_is_a_clear_error(tmp_path, bpe):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"kind": "bpe", "ranks": ')
    with pytest.raises(UserError, match="not readable JSON"):
        load_tokenizer(str(broken))
    for bad in [[], {"kind": "word"}, {"kind": "char"}, {"kind": "char", "chars": ["ab"]},
                {"kind": "bpe", "pattern": 1, "ranks": ""}, {**bpe.to_dict(), "ranks": "YQ== 0\n"},
                {**bpe.to_dict(), "special_tokens": {EOT: 5}}]:
        with pytest.raises(UserError, match="corrupt|ranks|bytes"):
            tokenizer_from_dict(bad)
