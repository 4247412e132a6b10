import math

import pytest
import torch
import torch.nn.functional as F

from model.gpt import GPT, GPTConfig, KVCache, Linear, filter_logits, sample_next_token
from model.kernels import Decoder


def tiny(arch, **overrides):
    settings = dict(arch=arch, vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32)
    settings.update(overrides)
    torch.manual_seed(0)
    return GPT(GPTConfig(**settings)).eval()


def test_gpt2_124m_has_gpt2s_parameter_count():
    model = GPT(GPTConfig(arch="gpt2", vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    assert model.num_params() == 124_439_808


def test_padded_vocabulary_rows_are_never_scored():
    model = tiny("gpt2", vocab_pad_multiple=64)
    assert model.wte.weight.shape[0] == 64
    logits, _ = model(torch.zeros(1, 5, dtype=torch.long))
    assert logits.shape[-1] == 61


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_kv_cache_matches_full_recompute(arch):
    model = tiny(arch)
    idx = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(1))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, "cpu", torch.float32)
    pieces = [model(idx[:, :9], kv_cache=cache)[0], model(idx[:, 9:16], kv_cache=cache)[0]]
    for t in range(16, 30):  # then one token at a time, as generation does
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache)[0])
    cached = torch.cat(pieces, dim=1)
    assert torch.allclose(cached, full, atol=1e-5), (cached - full).abs().max()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_generation_is_the_same_with_and_without_the_cache(arch):
    model = tiny(arch, block_size=16)
    prompt = [3, 1, 4, 1, 5]
    with_cache = list(model.generate(prompt, 11, temperature=0))  # fills the context exactly
    without = list(model.generate(prompt, 11, temperature=0, use_kv_cache=False))
    assert with_cache == without
    # past the context the cache restarts from the last half; generation keeps going
    assert len(list(model.generate(prompt, 40, temperature=0))) == 40


def test_llama_has_no_biases_and_gpt2_has_them():
    assert not any(name.endswith("bias") for name, _ in tiny("llama").named_parameters())
    assert any(name.endswith("attn.c_attn.bias") for name, _ in tiny("gpt2").named_parameters())


def test_residual_projections_get_a_smaller_init():
    model = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=8, n_head=4, n_embd=256))
    projection_std = model.blocks[0].attn.c_proj.weight.std().item()
    assert projection_std == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert model.blocks[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_loss_at_initialisation_is_close_to_a_uniform_guess():
    model = tiny("gpt2")
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randint(0, 61, (2, 8, 32), generator=generator)
    _, loss = model(inputs, targets)
    assert abs(loss.item() - math.log(61)) < 0.3


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept_k = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept_k.tolist() == [True, True, False, False]
    kept_p = torch.isfinite(filter_logits(logits, top_p=0.7))  # 0.5 < 0.7 <= 0.5 + 0.3
    assert kept_p.tolist() == [True, True, False, False]
    kept_p = torch.isfinite(filter_logits(logits, top_p=0.4))  # the first token alone
    assert kept_p.tolist() == [True, False, False, False]
    assert sample_next_token(logits, temperature=0) == 0
    generator = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, 1.0, top_k=2, generator=generator) for _ in range(200)}
    assert draws == {0, 1}


RECIPE_OPTIONS = [dict(mlp_activation="relu2"), dict(qk_norm=True), dict(logit_softcap=15.0),
                  dict(zero_init_proj=True), dict(tie_embeddings=False)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("option", RECIPE_OPTIONS, ids=lambda o: next(iter(o)))
def test_recipe_options_keep_the_kv_cache_exact_and_train(arch, option):
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch=arch, vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, **option))
    ids = torch.randint(0, 32, (1, 12))
    full, _ = model(ids)
    cache = KVCache(model.config, 1, "cpu", torch.float32)
    first, _ = model(ids[:, :7], kv_cache=cache)
    rest, _ = model(ids[:, 7:], kv_cache=cache)
    assert torch.allclose(full, torch.cat([first, rest], dim=1), atol=1e-5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        _, loss = model(ids, ids)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.5, losses


def test_softcap_bounds_the_logits_and_zero_init_starts_blocks_as_the_identity():
    capped = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16, logit_softcap=2.0))
    with torch.no_grad():
        capped.lm_head.weight.mul_(1000)
    logits, _ = capped(torch.arange(8)[None])
    assert logits.abs().max() <= 2.0
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, zero_init_proj=True))
    for block in model.blocks:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    assert GPTConfig(mlp_activation="relu2").mlp_hidden == 4 * 768  # no gate: GPT-2's width


@pytest.fixture
def two_threads():
    """Two threads, whatever the machine has: the one-row product is split one slice per thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_a_one_row_product_split_over_the_cores_is_the_plain_product(monkeypatch, two_threads):
    torch.manual_seed(0)
    layer = Linear(512, 1024)  # 2**19 weights: big enough to be split
    x = torch.randn(1, 1, 512)
    expected = F.linear(x, layer.weight, layer.bias)
    layer.weight.data = layer.weight.data.t().contiguous().t()  # as GPT.use_cpu_decoding_layout lays it out
    layer.split_over_cores()
    batched = []
    monkeypatch.setattr(torch, "bmm", lambda *args, bmm=torch.bmm: batched.append(1) or bmm(*args))
    with torch.inference_mode():
        split = layer(x)
    assert batched, "the one-row product was not split"
    assert torch.allclose(split, expected, atol=1e-5), (split - expected).abs().max()
    # weights replaced since (a model moved, or reloaded with new tensors): the plain product
    layer.weight = torch.nn.Parameter(torch.zeros(1024, 512))
    with torch.inference_mode():
        assert torch.equal(layer(x), layer.bias.expand(1, 1, 1024))


def test_generation_in_pytorch_on_the_cpu_keeps_the_weights_and_lays_them_out_for_one_row_products(
        two_threads, monkeypatch):
    # (where the C code cannot run the model, or is not built: see test_kernels.py for where it can)
    monkeypatch.setattr(Decoder, "make", classmethod(lambda cls, model, kv_cache: None))
    model = tiny("gpt2", n_embd=256, n_head=4)  # c_fc and c_proj have 2**18 weights: split
    before = {name: p.clone() for name, p in model.named_parameters()}
    prompt = [3, 1, 4, 1, 5]
    with_cache = list(model.generate(prompt, 11, temperature=0))  # one row at a time: split products
    without = list(model.generate(prompt, 11, temperature=0, use_kv_cache=False))  # whole rows
    assert with_cache == without
    assert model.blocks[0].mlp.c_fc.weight.t().is_contiguous()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert model.lm_head.weight is model.wte.weight  # still one tied matrix
