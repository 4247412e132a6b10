"""LoRA: fine-tune a model by training two thin matrices beside each chosen weight matrix.

A frozen weight W (out x in) gets an adapter: B (out x r) and A (r x in), with r much smaller
than either side, and the layer computes

    W x + (alpha / r) B A x

Only A and B learn. A starts random and B at zero, so before the first step the adapted model
is exactly the base. After training, B A can be added into W once (merge): the model is then
as fast as the base, and unmerge subtracts it again.

Targets use the model's own names. The attention's query, key and value share one fused
matrix (attn.c_attn, rows q | k | v); `q`, `k` and `v` put an adapter on their own row slice
of it, each with its own A and B. `attn.c_proj`, `mlp.c_fc`, `mlp.c_gate` (llama only) and
`mlp.c_proj` adapt the whole matrix. The default, q and v, is the LoRA paper's choice.
"""

import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.errors import UserError
from model.gpt import GPTConfig, Linear

ATTENTION_SLICES = ("q", "k", "v")
WHOLE_MATRICES = ("attn.c_proj", "mlp.c_fc", "mlp.c_gate", "mlp.c_proj")
DEFAULT_TARGETS = "q,v"


def known_targets(arch):
    return [*ATTENTION_SLICES, *(t for t in WHOLE_MATRICES if arch == "llama" or t != "mlp.c_gate")]


def parse_targets(text, arch):
    """'q,v' -> ['q', 'v'] in a fixed order; 'all' -> every linear layer of the blocks."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    valid = known_targets(arch)
    if names == ["all"]:
        return valid
    for name in names:
        if name not in valid:
            raise UserError(f"unknown LoRA target {name!r} for a {arch} model: use a comma-separated "
                            f"list of {', '.join(valid)}, or all")
    if not names:
        raise UserError(f"--lora_targets is empty: use a comma-separated list of {', '.join(valid)}, or all")
    return [t for t in valid if t in names]


class LoRALinear(nn.Module):
    """A linear layer whose frozen weight has adapters on row slices (one per name in `rows`).

    It holds the base layer's own weight and bias Parameters under the same names, so the
    model's state_dict keeps the base's keys and adds lora_A.<name> / lora_B.<name>."""

    def __init__(self, linear, rows, rank, alpha, dropout):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.rows = rows  # name -> (first row, end row) of the weight this adapter changes
        self.scaling = alpha / rank
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (start, stop) in rows.items():
            A = torch.empty(rank, self.in_features, device=linear.weight.device)
            # nn.Linear's own initialisation (and the paper's code, and peft's): uniform, scaled to the fan-in
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(A)
            # B = 0: the adapter adds nothing until it has learned something
            self.lora_B[name] = nn.Parameter(torch.zeros(stop - start, rank, device=linear.weight.device))
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        x = self.dropout(x)
        for name, (start, stop) in self.rows.items():
            # x A^T is r numbers per position: the adapter never builds an (out x in) matrix
            y[..., start:stop] += self.scaling * F.linear(F.linear(x, self.lora_A[name]), self.lora_B[name])
        return y

    def delta(self, name):
        """The adapter as a change of the weight's rows: (alpha / r) B A."""
        return self.scaling * self.lora_B[name] @ self.lora_A[name]

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            for name, (start, stop) in self.rows.items():
                self.weight[start:stop] += self.delta(name).to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            for name, (start, stop) in self.rows.items():
                self.weight[start:stop] -= self.delta(name).to(self.weight.dtype)
            self.merged = False


def attention_rows(config):
    """Row ranges of q, k and v in the fused attn.c_attn weight."""
    q_size = config.n_head * config.head_size
    kv_size = config.n_kv_head * config.head_size
    return {"q": (0, q_size), "k": (q_size, q_size + kv_size), "v": (q_size + kv_size, q_size + 2 * kv_size)}


def add_lora(model, rank, alpha, dropout, targets):
    """Freeze every parameter of `model` and put adapters on `targets` in every block."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    slices = {name: span for name, span in attention_rows(model.config).items() if name in targets}
    for block in model.blocks:
        if slices:
            block.attn.c_attn = LoRALinear(block.attn.c_attn, slices, rank, alpha, dropout)
        for target in WHOLE_MATRICES:
            if target in targets:
                parent, child = target.split(".")
                module = getattr(block, parent)
                linear = getattr(module, child)
                setattr(module, child, LoRALinear(linear, {"full": (0, linear.out_features)}, rank, alpha, dropout))


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def adapter_state_dict(model):
    """Only the adapters' tensors: what a LoRA run's checkpoint stores."""
    return {name: tensor for name, tensor in model.state_dict().items() if ".lora_A." in name or ".lora_B." in name}


def load_adapter_state_dict(model, state):
    expected = set(adapter_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(f"the adapter does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(state, strict=False)


def merge(model):
    for layer in lora_layers(model):
        layer.merge()


def unmerge(model):
    for layer in lora_layers(model):
        layer.unmerge()


def merge_and_remove(model):
    """Fold every adapter into its weight and put plain Linear layers back: the result is
    an ordinary GPT, as fast as the base, that every script (export, run.py) understands."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                linear = Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                linear.weight, linear.bias = child.weight, child.bias
                setattr(module, child_name, linear)
    return model


def trainable_summary(model, rank, targets):
    """`LoRA r=8 on q,v: 294,912 trainable of 124,734,720 (0.24%)`"""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"LoRA r={rank} on {','.join(targets)}: {trainable:,} trainable of {total:,} ({trainable / total:.2%})"


def weights_sha256(model):
    """SHA-256 of a model's weights: every state_dict tensor, by name in sorted order, with its
    dtype and shape. A LoRA run stores it to recognise its base later."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ---- the peft library's format ----------------------------------------------------------------

PEFT_GPT2_NAMES = {"attn.c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "mlp.c_fc",
                   "mlp.c_proj": "mlp.c_proj"}
PEFT_LLAMA_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                    "attn.c_proj": "self_attn.o_proj", "mlp.c_gate": "mlp.gate_proj",
                    "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}


def peft_adapter(adapter_state, model_config, lora_settings):
    """(adapter_config.json's dict, adapter_model.safetensors' tensors) for transformers' model of
    the same weights (GPT2LMHeadModel or LlamaForCausalLM), as the peft library saves them.

    Llama has separate q/k/v projections: each slice adapter maps to one. GPT-2 keeps q, k, v
    fused in one Conv1D (c_attn), which peft adapts as a whole: n slice adapters of rank r
    become one adapter of rank n*r with A = [A_q; A_v] stacked and B block-structured (B_q
    writes only the q rows, B_v only the v rows), and alpha times n, so alpha / rank stays."""
    rank, alpha, targets = lora_settings["rank"], lora_settings["alpha"], lora_settings["targets"]
    arch = model_config["arch"]
    slices = [t for t in targets if t in ATTENTION_SLICES]
    tensors, ranks, alphas = {}, {}, {}
    prefix = "base_model.model.transformer.h" if arch == "gpt2" else "base_model.model.model.layers"

    def put(layer, module, A, B, module_rank):
        key = f"{prefix}.{layer}.{module}"
        tensors[f"{key}.lora_A.weight"] = A.contiguous()
        tensors[f"{key}.lora_B.weight"] = B.contiguous()
        short = module.split(".")[-1]
        ranks[short], alphas[short] = module_rank, alpha * module_rank / rank

    for layer in range(model_config["n_layer"]):
        ours = f"blocks.{layer}"
        if arch == "gpt2" and slices:
            rows = attention_rows(GPTConfig(**model_config))
            out_features = rows["v"][1]
            A = torch.cat([adapter_state[f"{ours}.attn.c_attn.lora_A.{s}"] for s in slices])
            B = torch.zeros(out_features, rank * len(slices), dtype=A.dtype)
            for i, s in enumerate(slices):
                start, stop = rows[s]
                B[start:stop, i * rank:(i + 1) * rank] = adapter_state[f"{ours}.attn.c_attn.lora_B.{s}"]
            put(layer, "attn.c_attn", A, B, rank * len(slices))
        elif slices:
            for s in slices:
                put(layer, PEFT_LLAMA_NAMES[s], adapter_state[f"{ours}.attn.c_attn.lora_A.{s}"],
                    adapter_state[f"{ours}.attn.c_attn.lora_B.{s}"], rank)
        for target in WHOLE_MATRICES:
            if target in targets:
                names = PEFT_GPT2_NAMES if arch == "gpt2" else PEFT_LLAMA_NAMES
                put(layer, names[target], adapter_state[f"{ours}.{target}.lora_A.full"],
                    adapter_state[f"{ours}.{target}.lora_B.full"], rank)

    modules = sorted(ranks)
    if len(set(ranks.values())) == 1:  # one rank for every module (GPT-2 with q,v only: 2r and 2 alpha)
        rank, alpha = ranks[modules[0]], alphas[modules[0]]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "lora_dropout": lora_settings["dropout"], "target_modules": modules, "bias": "none",
              # GPT-2's Conv1D stores weights as (in, out); peft then transposes B A when merging
              "fan_in_fan_out": arch == "gpt2", "inference_mode": True, "init_lora_weights": True,
              "rank_pattern": {m: ranks[m] for m in modules if ranks[m] != rank},
              "alpha_pattern": {m: alphas[m] for m in modules if ranks[m] != rank},
              "base_model_name_or_path": None, "modules_to_save": None, "use_rslora": False}
    return config, tensors

