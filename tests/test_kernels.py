"""Generation's C code (model/kernels.c), each function checked against what it replaces: the 8-bit
product against float64 arithmetic on the same int8 numbers, and a whole token (decode_token)
against the model's own forward pass, for every shape of model it runs, in float32 and 8 bits.
Where it cannot run a model, generation must stay in PyTorch and still be right."""

import copy
import platform

import pytest
import torch

from conftest import needs_a_c_compiler
from model import kernels
from model.gpt import GPT, GPTConfig, KVCache
from model.kernels import Decoder
from model.lora import add_lora
from model.quant import quantize_model

# every option of the model that changes what a token computes, each in at least one shape
SHAPES = {
    "gpt2": dict(arch="gpt2"),
    "gpt2-swiglu": dict(arch="gpt2", mlp_activation="swiglu"),
    "llama-gqa": dict(arch="llama", n_kv_head=2),
    "llama-qk-norm-untied-relu2-softcap": dict(arch="llama", qk_norm=True, tie_embeddings=False,
                                               mlp_activation="relu2", logit_softcap=15.0),
    "llama-padded-vocab-rope-scaling": dict(arch="llama", vocab_pad_multiple=64, rope_scaling=dict(
        rope_type="llama3", factor=8.0, original_max_position_embeddings=16, low_freq_factor=1.0,
        high_freq_factor=4.0)),
}
# float32 sums in another order than PyTorch's: what that changes in a logit, against the largest
SUM_ORDER_TOLERANCE = 1e-5


def tiny(quant="", **overrides):
    settings = dict(arch="llama", vocab_size=61, block_size=64, n_layer=2, n_head=4, n_embd=64)
    settings.update(overrides)
    torch.manual_seed(0)
    return quantize_model(GPT(GPTConfig(**settings)).eval(), quant)


def decode_both_ways(model, tokens, library=None):
    """Read a prompt into two caches with the forward pass, then feed each token to both the
    forward pass and a Decoder: their logits side by side, and the two caches."""
    prompt = torch.tensor([[1, 5, 9, 20, 3]])
    reference = KVCache(model.config, 1, "cpu", torch.float32, 40)
    ours = KVCache(model.config, 1, "cpu", torch.float32, 40)
    with torch.inference_mode():
        model(prompt, kv_cache=reference)
        model(prompt, kv_cache=ours)
        decoder = Decoder(model, ours, library or kernels.library())
        pairs = [(model(torch.tensor([[t]]), kv_cache=reference)[0], decoder(t)) for t in tokens]
    return pairs, reference, ours


@needs_a_c_compiler
@pytest.mark.parametrize("quant", ["", "q8_0"])
@pytest.mark.parametrize("shape", SHAPES)
def test_a_token_in_c_gives_the_forward_passes_logits_and_cache(shape, quant):
    model = tiny(quant, **SHAPES[shape])
    pairs, reference, ours = decode_both_ways(model, [7, 11, 2, 40, 33, 12, 0, 60])
    for expected, got in pairs:
        assert got.shape == expected.shape == (1, 1, 61)
        assert (got - expected).abs().max() <= SUM_ORDER_TOLERANCE * expected.abs().max()
    assert ours.length == reference.length == 13
    for theirs, mine in ((reference.keys, ours.keys), (reference.values, ours.values)):
        assert (mine - theirs).abs().max() <= SUM_ORDER_TOLERANCE * theirs.abs().max()


@needs_a_c_compiler
@pytest.mark.parametrize("instructions", ["native", "avx2", "portable"])
def test_each_version_of_the_c_code_computes_the_product_and_the_token(instructions, tmp_path):
    """The C file has a version per instruction set; each is built here as a processor with only
    those instructions would build it: its 8-bit product checked against float64 on the same int8
    numbers, its whole token against the forward pass."""
    flags = {"native": ("-O3", "-march=native", "-fopenmp"), "avx2": ("-O3", "-mavx2", "-mfma"),
             "portable": ("-O3",)}[instructions]
    if instructions == "avx2" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("AVX2 is an x86 instruction set")
    path = kernels.build(flags, str(tmp_path))
    assert path is not None, "kernels.c did not build"
    library = kernels.Library(path, threads="-fopenmp" in flags)
    assert library.instructions == (instructions if instructions != "native" else kernels.library().instructions)
    generator = torch.Generator().manual_seed(4)
    for rows, out_features, in_features in [(1, 70, 576), (3, 33, 100), (16, 5, 7), (2, 1, 1536)]:
        values = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
        scale = torch.rand(out_features, generator=generator) * 0.01
        x = torch.randn(rows, in_features, generator=generator)
        got = kernels.int8_matvec(library, x, values, scale)
        expected = (x.double() @ values.double().T) * scale.double()
        assert got.shape == (rows, out_features)
        assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max(), (rows, out_features, in_features)
        # one x row's numbers do not depend on how many rows share the call
        for row in range(rows):
            assert torch.equal(got[row], kernels.int8_matvec(library, x[row:row + 1], values, scale)[0])
    # rows of 40 numbers: not whole vectors of any instruction set (the leftover loops)
    for quant in ("", "q8_0"):
        for expected, got in decode_both_ways(tiny(quant, n_embd=40, n_head=2, n_kv_head=1), [7, 11, 2], library)[0]:
            assert (got - expected).abs().max() <= SUM_ORDER_TOLERANCE * expected.abs().max()


@needs_a_c_compiler
@pytest.mark.parametrize("quant", ["", "q8_0"])
def test_generate_runs_each_token_in_c_and_writes_the_tokens_of_pytorch(quant, monkeypatch):
    model = tiny(quant, arch="gpt2")
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    calls = []
    real_call = Decoder.__call__
    monkeypatch.setattr(Decoder, "__call__", lambda self, token: calls.append(token) or real_call(self, token))
    greedy = list(model.generate(prompt, 30, temperature=0))
    drawn = list(model.generate(prompt, 30, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(3)))
    assert calls == greedy[:-1] + drawn[:-1]  # every token after the prompt's, and nothing else
    assert model.blocks[0].mlp.c_fc.weight_int8.is_contiguous() if quant else model.lm_head.weight.is_contiguous()
    monkeypatch.setattr(Decoder, "make", classmethod(lambda cls, model, kv_cache: None))  # PyTorch alone
    assert list(model.generate(prompt, 30, temperature=0)) == greedy
    assert list(model.generate(prompt, 30, temperature=0.9, top_k=20,
                               generator=torch.Generator().manual_seed(3))) == drawn


@needs_a_c_compiler
def test_what_the_c_code_cannot_run_stays_in_pytorch():
    """A LoRA layer, bfloat16 weights, recorded attention, training mode, a batch of sequences:
    no Decoder, and generation takes the forward pass (with its own CPU layout) instead."""
    cache = lambda model, batch=1, dtype=torch.float32: KVCache(model.config, batch, "cpu", dtype, 20)
    model = tiny()
    assert Decoder.make(model, cache(model)) is not None
    assert Decoder.make(model, cache(model, batch=2)) is None
    model.train()
    assert Decoder.make(model, cache(model)) is None
    model.eval()
    model.blocks[1].attn.record_attention = True
    assert Decoder.make(model, cache(model)) is None
    model.blocks[1].attn.record_attention = False
    half = tiny().to(torch.bfloat16)
    assert Decoder.make(half, cache(half, dtype=torch.bfloat16)) is None
    adapted = tiny()
    add_lora(adapted, rank=2, alpha=4, dropout=0.0, targets=["q", "v"])
    torch.manual_seed(1)
    for parameter in adapted.parameters():
        if parameter.requires_grad:  # (B starts at zero: give the adapters something to add)
            torch.nn.init.normal_(parameter, std=0.5)
    assert Decoder.make(adapted, cache(adapted)) is None
    prompt = [3, 1, 4, 1, 5]
    tokens = list(prompt)
    for _ in range(12):  # argmax of the plain, uncached forward pass at every step
        with torch.no_grad():
            tokens.append(int(adapted(torch.tensor([tokens]))[0][0, -1].argmax()))
    assert list(adapted.generate(prompt, 12, temperature=0)) == tokens[len(prompt):]
    # weights laid out for PyTorch's split products (what generate does where there is no Decoder)
    model.use_cpu_decoding_layout()
    assert Decoder.make(model, cache(model)) is None


@needs_a_c_compiler
def test_a_token_past_the_cache_or_the_vocabulary_is_refused_before_c_reads_it():
    model = tiny()
    kv_cache = KVCache(model.config, 1, "cpu", torch.float32, 3)
    decoder = Decoder.make(model, kv_cache)
    with pytest.raises(ValueError, match="the embedding 61 tokens"):
        decoder(61)
    for token in (1, 2, 3):
        decoder(token)
    with pytest.raises(ValueError, match="the cache holds 3 positions"):
        decoder(4)
    assert kv_cache.length == 3


@needs_a_c_compiler
def test_a_tokens_numbers_do_not_depend_on_the_thread_count():
    """Each matrix row and each attention head is one thread's whole sum, so two threads (what
    sample.py runs with on 2 cores) give exactly one thread's numbers. (The prompt is read once,
    by the forward pass, whose own sums may be split otherwise on two threads.)"""
    model = tiny("", n_kv_head=2)
    prompt = KVCache(model.config, 1, "cpu", torch.float32, 20)
    with torch.inference_mode():
        model(torch.tensor([[1, 5, 9, 20, 3]]), kv_cache=prompt)
    logits = {}
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            kv_cache = copy.deepcopy(prompt)
            decoder = Decoder.make(model, kv_cache)
            logits[threads] = [decoder(token) for token in (7, 11, 2, 40)]
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(one, two) for one, two in zip(logits[1], logits[2]))
