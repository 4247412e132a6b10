"""A decoder-only transformer, in the order you would explain it:
config, normalisation, attention (with a KV cache), MLP, block, model, generation.

One class, two faces:
  arch="gpt2"  GPT-2 exactly: learned positions, LayerNorm with bias, GELU MLP (4x),
               biases everywhere, input and output embeddings tied.
  arch="llama" the modern form: rotary positions (RoPE), RMSNorm, SwiGLU MLP, no biases.
               Embeddings are tied by default (as in the small Llama 3.2 models); imported
               models may untie them (tie_embeddings=False), use fewer key/value heads than
               query heads (grouped-query attention, n_kv_head) and llama3 RoPE scaling.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.kernels import Decoder


@dataclass
class GPTConfig:
    arch: str = "gpt2"          # "gpt2" or "llama"
    vocab_size: int = 50257     # real tokens; the embedding may be padded past this
    block_size: int = 1024      # longest context the model sees
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    vocab_pad_multiple: int = 1  # pad the embedding rows to a multiple of this (64 is GPU-friendly)
    rope_theta: float = 10000.0  # llama only
    # Fields real models need. Their defaults give the models this repository always trained,
    # so checkpoints written before they existed load unchanged.
    n_kv_head: int = 0          # key/value heads (grouped-query attention); 0 -> n_head
    head_size: int = 0          # 0 -> n_embd // n_head
    mlp_hidden: int = 0         # 0 -> the arch's default (see __post_init__)
    norm_eps: float = 1e-5      # added to the variance in LayerNorm / RMSNorm
    tie_embeddings: bool = True  # False: lm_head has its own matrix
    rope_scaling: dict | None = None  # None, or Llama 3.1's {"rope_type": "llama3", "factor", ...}
    # Changes from the GPT-2 speedrun's training recipe (bench.py --sections=recipe measures each).
    # The defaults are off, so arch="gpt2" stays GPT-2 exactly.
    mlp_activation: str = ""    # "" -> the arch's own (gelu for gpt2, swiglu for llama) | relu2
    qk_norm: bool = False       # RMS-normalise each head's queries and keys before attention
    logit_softcap: float = 0.0  # > 0: logits = softcap * tanh(logits / softcap)
    zero_init_proj: bool = False  # start every residual projection (attn/mlp c_proj) at zero

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"arch must be 'gpt2' or 'llama', not {self.arch!r}")
        if not self.head_size:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            self.head_size = self.n_embd // self.n_head
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.arch == "llama" and self.head_size % 2:
            raise ValueError("llama needs an even head size for rotary embeddings")
        self.mlp_activation = self.mlp_activation or ("gelu" if self.arch == "gpt2" else "swiglu")
        if self.mlp_activation not in ("gelu", "swiglu", "relu2"):
            raise ValueError(f"mlp_activation must be gelu, swiglu or relu2, not {self.mlp_activation!r}")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap must be 0 (off) or positive, not {self.logit_softcap}")
        if not self.mlp_hidden:
            if self.mlp_activation != "swiglu":
                self.mlp_hidden = 4 * self.n_embd
            else:
                # SwiGLU has three matrices instead of two; 2/3 of 4x keeps the parameter count
                # the same as GPT-2's MLP. Rounded up to a multiple of 64 for fast matmuls.
                self.mlp_hidden = (int(8 * self.n_embd / 3) + 63) // 64 * 64
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type") != "llama3":
            raise ValueError(f"unsupported rope_scaling {self.rope_scaling!r} (only rope_type llama3)")

    @property
    def padded_vocab_size(self):
        m = max(1, self.vocab_pad_multiple)
        return (self.vocab_size + m - 1) // m * m


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain (no mean, no bias)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == self.weight.dtype == torch.float32 and not torch.is_grad_enabled():
            # the same numbers as below in one call instead of eight (generation: a token's
            # small vectors cost more in per-operation overhead than in arithmetic)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # compute in float32: squares of bf16 activations lose too much precision
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def make_norm(config):
    if config.arch == "gpt2":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps)
    return RMSNorm(config.n_embd, eps=config.norm_eps)


def rope_frequencies(config):
    """RoPE's angle per position for each pair of dimensions (head_size // 2 of them): pair i
    turns by theta^(-2i/head_size) per position, from fast (i = 0) to very slow."""
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_size, 2, dtype=torch.float32) / config.head_size))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # Llama 3.1's context extension: wavelengths longer than the original context are
    # stretched `factor` times (slowed down), short ones stay as trained, and the band
    # between is blended smoothly. Written as transformers writes it, to give the same numbers.
    factor, old_context = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < old_context / high) & ~(wavelength > old_context / low)
    return torch.where(medium, blended, scaled)


def rope_angles(inv_freq, start_pos, T, device, dtype=torch.float32):
    """(cos, signed sin) of RoPE's angles for positions start_pos .. start_pos + T - 1, shaped
    (T, 1, head_size) to broadcast over (batch, T, heads, head_size), in the activations' dtype.
    Each pair's angle appears twice, once for each half of the head, and the sine's first half
    is negated, so that apply_rope is two products and a sum (see there)."""
    positions = torch.arange(start_pos, start_pos + T, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq.float())
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1)[:, None, :].to(dtype), torch.cat([-sin, sin], dim=-1)[:, None, :].to(dtype)


def apply_rope(x, cos, signed_sin):
    """Rotate each pair (x1, x2) = (x[i], x[i + half]) by its position's angle: attention scores
    then depend only on the distance between two positions, not on where they are.
    The rotation is [x1 cos - x2 sin, x2 cos + x1 sin] = [x1, x2] * cos + [x2, x1] * [-sin, sin]:
    rolling the head by half swaps its halves, and the sign lives in signed_sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Linear(nn.Linear):
    """nn.Linear, plus a faster way to multiply one row on a multi-core CPU (generation, where
    the token is not computed in C: see GPT.token_decoder).

    One token's vector times a weight matrix reads the whole matrix for very little arithmetic,
    so its speed is memory bandwidth, and PyTorch's CPU BLAS does it on one core. Splitting the
    inner dimension into one slice per core, as a batched matmul, lets every core read its own
    share of the matrix; adding the partial sums gives the same product (up to rounding). It
    needs the weight laid out (in, out) in memory: GPT.use_cpu_decoding_layout lays it out and
    calls split_over_cores, which keeps the (cores, in / cores, out) view that the product reads.
    Only matrices of 1 MB and more are split: a smaller one stays in the core's cache, where the
    extra operations cost more than they save. Used only without autograd, so training never
    takes this path."""

    split_weight = None  # the weight's (cores, in / cores, out) view, or None: not split

    def split_over_cores(self):
        weight_t = self.weight.detach().t()
        cores = torch.get_num_threads()
        if (cores > 1 and self.weight.numel() >= 2**18 and weight_t.is_contiguous() and weight_t.device.type == "cpu"
                and self.in_features % cores == 0):
            self.split_weight = weight_t.view(cores, self.in_features // cores, self.out_features)

    def forward(self, x):
        split = self.split_weight
        # (the view is checked to still be the weight's memory: a model moved or reloaded since
        # has new weights, and then takes the plain path)
        if (split is not None and x.numel() == self.in_features and not torch.is_grad_enabled()
                and split.data_ptr() == self.weight.data_ptr()):
            y = torch.bmm(x.reshape(len(split), 1, -1), split).sum(0)
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


class KVCache:
    """Keys and values of every position seen so far, per layer, so each new token only
    computes its own query/key/value instead of recomputing the whole context.

    It holds max_length positions (default block_size): generation asks only for what it
    will use, since a real model's block_size can be 131,072 positions (gigabytes of cache).
    With grouped-query attention it stores only the n_kv_head shared heads."""

    def __init__(self, config, batch_size, device, dtype, max_length=None):
        max_length = min(max_length or config.block_size, config.block_size)
        shape = (config.n_layer, batch_size, config.n_kv_head, max_length, config.head_size)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled
        # each layer's (keys, values) of the first sequence, (n_kv_head, max_length, head_size) views
        # made once: generating one sequence reads them per layer per token
        self.first_sequence = [(self.keys[layer, 0], self.values[layer, 0]) for layer in range(config.n_layer)]

    def reset(self):
        self.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_index):
        super().__init__()
        bias = config.arch == "gpt2"
        self.config = config
        self.layer_index = layer_index
        # q, k, v in one matmul: n_head query heads, then n_kv_head key and n_kv_head value heads
        qkv_size = (config.n_head + 2 * config.n_kv_head) * config.head_size
        self.c_attn = Linear(config.n_embd, qkv_size, bias=bias)
        self.c_proj = Linear(config.n_head * config.head_size, config.n_embd, bias=bias)
        self.c_proj.residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)
        self.record_attention = False  # explain.py sets this to keep the attention weights
        self.last_attention = None

    def forward(self, x, start_pos=0, kv_cache=None, rope=None):
        B, T, C = x.shape
        n_head, n_kv_head, head_size = self.config.n_head, self.config.n_kv_head, self.config.head_size
        qkv = self.c_attn(x)
        if T == 1 and B == 1 and kv_cache is not None and not (self.training or self.record_attention
                                                               or torch.is_grad_enabled()):
            return self._attend_next_token(qkv, start_pos, kv_cache, rope)
        # (B, T, heads * head_size) -> (B, T, heads, head_size): each head attends independently.
        # The queries' and keys' heads come first, side by side: normalised and rotated in one go.
        qk, v = qkv.view(B, T, n_head + 2 * n_kv_head, head_size).split([n_head + n_kv_head, n_kv_head], dim=2)
        if self.config.qk_norm:
            # Unit-RMS queries and keys bound every attention score, so no logit can grow
            # until its softmax saturates: the speedrun's fix for attention that trains unstably.
            qk = F.rms_norm(qk, (head_size,), eps=self.config.norm_eps)
        if rope is not None:
            qk = apply_rope(qk, *rope)
        q, k = qk.transpose(1, 2).split([n_head, n_kv_head], dim=1)  # (B, heads, T, head_size)
        v = v.transpose(1, 2)

        if kv_cache is not None:
            kv_cache.keys[self.layer_index, :B, :, start_pos:start_pos + T] = k
            kv_cache.values[self.layer_index, :B, :, start_pos:start_pos + T] = v
            k = kv_cache.keys[self.layer_index, :B, :, :start_pos + T]
            v = kv_cache.values[self.layer_index, :B, :, :start_pos + T]
        # Grouped-query attention (n_kv_head < n_head): each key/value head serves n_head / n_kv_head
        # query heads (consecutive ones, as in transformers), which makes the cache that many times
        # smaller; scaled_dot_product_attention(enable_gqa=True) pairs them without copying k and v.
        grouped = n_kv_head != n_head
        if grouped and (self.record_attention or torch.is_grad_enabled()):
            # Training (and explain.py's by-hand attention) copies each key/value head for its
            # queries: the gradients then add up in the order training has always used.
            k, v = (t.repeat_interleave(n_head // n_kv_head, dim=1) for t in (k, v))
            grouped = False

        # Query i (at absolute position start_pos + i) may look at keys 0 .. start_pos + i.
        # With no earlier positions that is the plain causal mask; after a cache prefix
        # the mask is offset, and a single new token may look at everything.
        if start_pos == 0:
            mask, is_causal = None, T > 1
        elif T == 1:
            mask, is_causal = None, False
        else:
            key_pos = torch.arange(start_pos + T, device=x.device)
            query_pos = torch.arange(start_pos, start_pos + T, device=x.device)
            mask, is_causal = key_pos[None, :] <= query_pos[:, None], False

        if self.record_attention:
            y = self._attention_by_hand(q, k, v, start_pos)
        else:
            dropout = self.config.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                               enable_gqa=grouped)
        y = y.transpose(1, 2).contiguous().view(B, T, n_head * head_size)  # heads side by side again
        y = self.c_proj(y)
        return self.resid_dropout(y) if self.training else y

    def _attend_next_token(self, qkv, pos, kv_cache, rope):
        """Attention for one new token of one sequence (generation): the numbers of forward's general
        path in a third of its operations. Each operation has a fixed cost of a few
        microseconds, more than its arithmetic on vectors this small, and a real model runs this
        once per layer per token. The queries that share a key/value head are stacked as its
        rows, so grouped-query attention copies nothing, and three small products replace
        scaled_dot_product_attention, whose CPU kernel costs more to set up than they do."""
        n_head, n_kv_head, head_size = self.config.n_head, self.config.n_kv_head, self.config.head_size
        qkv = qkv.view(n_head + 2 * n_kv_head, head_size)
        qk, v = qkv[:n_head + n_kv_head], qkv[n_head + n_kv_head:]
        if self.config.qk_norm:
            qk = F.rms_norm(qk, (head_size,), eps=self.config.norm_eps)
        if rope is not None:
            qk = apply_rope(qk, *rope).view(n_head + n_kv_head, head_size)
        keys, values = kv_cache.first_sequence[self.layer_index]
        keys.select(1, pos).copy_(qk[n_head:])  # (select and narrow: one operation each, where indexing takes two)
        values.select(1, pos).copy_(v)
        keys, values = keys.narrow(1, 0, pos + 1), values.narrow(1, 0, pos + 1)
        q = qk[:n_head].view(n_kv_head, n_head // n_kv_head, head_size)
        scores = (q @ keys.transpose(1, 2)) * (1.0 / math.sqrt(head_size))
        weights = scores.softmax(-1, dtype=torch.float32)
        if weights.dtype != v.dtype:
            weights = weights.to(v.dtype)
        y = weights @ values
        return self.c_proj(y.view(1, 1, n_head * head_size))

    def _attention_by_hand(self, q, k, v, start_pos):
        """softmax(q k^T / sqrt(d)) v written out, keeping the weights for inspection."""
        T, total = q.shape[2], k.shape[2]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        key_pos = torch.arange(total, device=q.device)
        query_pos = torch.arange(start_pos, start_pos + T, device=q.device)
        scores = scores.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
        weights = scores.softmax(dim=-1)
        self.last_attention = weights.detach()
        return weights @ v


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.activation = config.mlp_activation
        bias = config.arch == "gpt2"
        # c_fc widens, c_proj narrows back, in both archs (GPT-2's names).
        self.c_fc = Linear(config.n_embd, config.mlp_hidden, bias=bias)
        if self.activation == "swiglu":
            # SwiGLU: silu(x c_gate) * (x c_fc), then c_proj. The gate lets each unit switch itself off.
            self.c_gate = Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.c_proj = Linear(config.mlp_hidden, config.n_embd, bias=bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.activation == "gelu":
            hidden = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2's tanh approximation
        elif self.activation == "relu2":
            # ReLU squared (Primer, then the speedrun): as cheap as ReLU, smooth at 0, and its
            # outputs are sparse: most units are exactly off for a given token.
            hidden = F.relu(self.c_fc(x)).square()
        else:
            hidden = F.silu(self.c_gate(x)) * self.c_fc(x)
        y = self.c_proj(hidden)
        return self.dropout(y) if self.training else y  # (in eval, dropout is the identity: one call less)


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, layer_index):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_index)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, start_pos=0, kv_cache=None, rope=None):
        x = x + self.attn(self.ln_1(x), start_pos, kv_cache, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        if config.arch == "gpt2":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:
            # not saved in checkpoints: a pure function of the config
            self.register_buffer("rope_inv_freq", rope_frequencies(config), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            # Tied embeddings: the same matrix turns tokens into vectors and vectors into scores.
            self.lm_head.weight = self.wte.weight
        if self.wte.weight.device.type != "meta":  # on "meta" (shapes only: weights come from a file) there is nothing to fill
            self.apply(self._init_weights)

    @classmethod
    def uninitialised(cls, config):
        """A model whose weights are uninitialised float32 memory, for weights about to be
        loaded from a file: no time spent drawing random numbers that would be overwritten.
        Built on the meta device (shapes only), then each tensor gets its memory. (model.to_empty
        would do that too, but on meta tensors it imports sympy: seconds of start-up.)"""
        reset = nn.Embedding.reset_parameters
        nn.Embedding.reset_parameters = lambda self: None  # normal_ on meta imports torch's compiler stack
        try:
            with torch.device("meta"):
                model = cls(config)
        finally:
            nn.Embedding.reset_parameters = reset
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(torch.empty(tuple(param.shape), dtype=param.dtype)))
            for name, buffer in list(module.named_buffers(recurse=False)):
                setattr(module, name, torch.empty(tuple(buffer.shape), dtype=buffer.dtype))
        if config.tie_embeddings:  # each module got its own new tensor: tie them again
            model.lm_head.weight = model.wte.weight
        if config.arch == "llama":
            model.rope_inv_freq.copy_(rope_frequencies(config))  # a buffer, not a weight: computed
        return model

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                # Each block adds two outputs to the residual stream; scaling their init by
                # 1/sqrt(2 * n_layer) keeps the stream's variance from growing with depth.
                # zero_init_proj goes all the way: every block starts as the identity and
                # the gradient decides what each adds (the speedrun's choice).
                std = 0.0 if self.config.zero_init_proj else 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        """Every parameter counted once (the tied embedding is one matrix)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len):
        """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's
        q.k and weights.v products, which grow with the context (the PaLM paper's formula)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * seq_len

    def forward(self, idx, targets=None, kv_cache=None, last_only=False):
        """idx (B, T) token ids -> logits (B, T, vocab_size) and, given targets, the mean
        cross-entropy loss in nats. With a kv_cache, idx continues where the cache ends.
        last_only: logits of the last position only, (B, 1, vocab_size): all that generation
        needs, and for a long prompt the output layer is a large part of the work."""
        B, T = idx.shape
        start_pos = kv_cache.length if kv_cache is not None else 0
        if start_pos + T > self.config.block_size:
            raise ValueError(f"sequence of {start_pos + T} tokens is longer than block_size {self.config.block_size}")
        x = self.wte(idx)
        rope = None
        if self.config.arch == "gpt2":
            x = x + self.wpe.weight[start_pos:start_pos + T]  # rows of the position table, no lookup op
        else:
            # angles for just these positions: cheap, and no table of block_size rows to keep
            rope = rope_angles(self.rope_inv_freq, start_pos, T, idx.device, x.dtype)
        if self.training:
            x = self.drop(x)
        for block in self.blocks:
            x = block(x, start_pos, kv_cache, rope)
        if kv_cache is not None:
            kv_cache.length += T
        if last_only:
            x = x[:, -1:]
        x = self.ln_f(x)
        # the padded rows exist only to make the matmul fast; they are never scored or sampled
        logits = self.lm_head(x)[..., :self.config.vocab_size]
        if self.config.logit_softcap:
            # a smooth ceiling on how sure the model can be: tanh bends large logits down to
            # +-softcap, so no token's score runs away early in training (Gemma 2, the speedrun)
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if targets is not None:
            # a target of -1 is not scored (chat data: only the assistant's tokens are trained)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def use_cpu_decoding_layout(self):
        """Store each float32 weight matrix transposed in memory: same values, same shape, other
        strides. Generating one token multiplies one vector by every matrix, and with the
        matrix laid out (in, out) the Linear layers can split that work over the CPU's cores
        (see Linear). Done once, in place: no second copy of the weights is kept. (bfloat16
        weights stay as they are: the CPU's bfloat16 kernels are slower on this layout.)"""
        # (made outside generate's inference mode: inference tensors could never train again)
        with torch.inference_mode(False), torch.no_grad():
            for module in self.modules():
                weight = getattr(module, "weight", None)
                if (isinstance(module, (nn.Linear, nn.Embedding)) and weight.dtype == torch.float32
                        and weight.is_contiguous()):
                    module.weight.data = weight.data.t().contiguous().t()
            for module in self.modules():  # (after the loop above: a tied lm_head shares wte's new layout)
                if isinstance(module, Linear):
                    module.split_over_cores()

    def token_decoder(self, kv_cache):
        """What computes the logits of each new token on this cache, one token at a time: on a CPU,
        the whole token in C where it can (model/kernels.py's Decoder: a function of the token id),
        else None, and then this model's own forward pass does, with its weights laid out for the
        CPU's cores (use_cpu_decoding_layout). The forward pass is the reference; the C code is
        tested against it."""
        if kv_cache.keys.device.type != "cpu":
            return None
        decoder = Decoder.make(self, kv_cache)
        if decoder is None:
            self.use_cpu_decoding_layout()
        return decoder

    @torch.inference_mode()  # no autograd bookkeeping at all: cheaper per op than no_grad
    def generate(self, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 eos_id=None, generator=None, use_kv_cache=True):
        """Yield new token ids one at a time (so callers can stream them).

        Prompts longer than the context are cropped from the left. With the KV cache, once
        the context is full, the cache restarts from the most recent half of the context
        (one recompute every block_size/2 tokens instead of one per token)."""
        block_size = self.config.block_size
        device, dtype = self.ln_f.weight.device, self.ln_f.weight.dtype  # (8-bit models have no wte.weight)
        tokens = list(prompt_ids)[-block_size:]
        if not tokens:
            raise ValueError("generate needs at least one prompt token")
        kv_cache = decode_token = None
        if use_kv_cache:
            kv_cache = KVCache(self.config, 1, device, dtype, len(tokens) + max_new_tokens)
            decode_token = self.token_decoder(kv_cache)
            logits, _ = self(torch.tensor([tokens], device=device), kv_cache=kv_cache, last_only=True)
        else:
            logits, _ = self(torch.tensor([tokens], device=device), last_only=True)
        for count in range(1, max_new_tokens + 1):
            next_id = sample_next_token(logits[0, -1], temperature, top_k, top_p, generator)
            yield next_id
            if count == max_new_tokens or (eos_id is not None and next_id == eos_id):
                return  # (the last token's logits would never be used)
            tokens.append(next_id)
            if not use_kv_cache:
                logits, _ = self(torch.tensor([tokens[-block_size:]], device=device), last_only=True)
            elif kv_cache.length < block_size:
                if decode_token is not None:
                    logits = decode_token(next_id)
                else:
                    logits, _ = self(torch.tensor([[next_id]], device=device), kv_cache=kv_cache)
            else:
                kv_cache.reset()
                logits, _ = self(torch.tensor([tokens[-(block_size // 2):]], device=device), kv_cache=kv_cache,
                                 last_only=True)


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """The distribution sampling draws from: logits / temperature, then everything outside
    the top_k and outside the smallest set whose probability reaches top_p set to -inf."""
    logits = logits.float()
    if temperature != 1.0:  # (dividing by 1 would change no number: one operation less per token)
        logits = logits / max(temperature, 1e-8)
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth_value = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth_value, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked before it already reach top_p (the first stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id from a 1-D vector of logits. temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    # A draw from probs without torch.multinomial's set-up cost (10x the rest of this function
    # for one draw): with E_i independent Exponential(1) noise, argmax(p_i / E_i) picks token i
    # with probability exactly p_i (the smallest of E_i / p_i, exponential "arrival times").
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int(torch.argmax(probs / noise))
