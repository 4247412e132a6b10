"""8-bit weights: `--quant=q8_0` stores every weight matrix, and the token embedding, as int8
numbers and scales, a quarter of float32's bytes. Norms, biases and the KV cache stay float32.

Generating one token multiplies one vector by every weight matrix once: little arithmetic for
each number read, so the speed of generation is the speed at which the weights come out of
memory, and a quarter of the bytes is up to four times the speed. What it costs in quality is
what rounding every weight to one of 255 levels costs (bench.py --sections=real measures it
as bits per byte on held-out text).

One rounding rule (a weight w becomes round(w / scale), scale = max |w| / 127 of the numbers
that share it), two layouts:
  quantize_rows    one scale per output row, what the model runs with (quantize_model):
                   generation's products go through our C kernel (model/kernels.c, int8
                   weights times float32 activations, at the speed of memory), and model.bin
                   version 3 (export.py --quant=q8_0) stores these very numbers, so run.py
                   computes what sample.py --quant=q8_0 computes.
  quantize_groups  one float16 scale per 32 consecutive numbers of a row: llama.cpp's Q8_0,
                   written to GGUF files (export.py --format=gguf --quant=q8_0). model.bin
                   version 3 has Q8_0's layout too, with every group of a row given its row's
                   scale (row_scales_as_groups).

Every product of the 8-bit model is computed in float32 from the int8 numbers and their
scales, a few rows at a time by the C kernel and a prompt's many rows by the rebuilt float
matrix: the same numbers, up to the order of float32 sums. Where no C compiler is found, the
few-rows path is PyTorch's int8 kernel instead, which rounds what goes in and what comes out
to bfloat16 (about 1% of each product: the same greedy text on the models we tested, slower).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import kernels
from model.errors import UserError

QUANT_KINDS = ("q8_0",)  # '' (no quantization) is the default everywhere
GROUP_SIZE = 32  # numbers per scale in model.bin's 8-bit layout (Q8_0's block)


def check_quant(kind):
    if kind and kind not in QUANT_KINDS:
        raise UserError(f"unknown --quant={kind!r}: use q8_0 (8-bit weights) or leave it empty (float32)")


def round_half_away(x):
    """Round to the nearest integer, halves away from zero (C's roundf, as llama.cpp rounds)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


SMALLEST_SCALE = 2.0**-17  # the smallest scale whose bfloat16 value float16 also holds exactly


def quantize_rows(weight, rows_at_a_time=4096):
    """(int8 values, bfloat16 scale per row) with weight ~ values * scale[:, None]. The scale is
    rounded to bfloat16 (PyTorch's int8 kernel, the fallback, multiplies by it in that precision)
    before the values are rounded against it, so the two together are the best 8-bit fit that
    both kernels can use. A nonzero row's scale is at least SMALLEST_SCALE (a row whose largest
    weight is under 0.001 gets a coarser step than it could): every scale is then exact in float16
    too, the type model.bin's scales have, so the file holds exactly these numbers. The rows are
    rounded rows_at_a_time at once, so the rounding's float temporaries never span a whole
    embedding (four of 113 MB at once for SmolLM2's)."""
    weight = weight.detach()
    chunks = [slice(start, start + rows_at_a_time) for start in range(0, len(weight), rows_at_a_time)] or [slice(0, 0)]
    scale = torch.cat([weight[rows].abs().amax(dim=1) for rows in chunks]).float() / 127
    scale = torch.where(scale > 0, scale.clamp(min=SMALLEST_SCALE), scale).to(torch.bfloat16)
    inverse = torch.where(scale > 0, 1 / scale.float(), torch.zeros(()))  # an all-zero row stays zero
    values = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    for rows in chunks:
        values[rows] = round_half_away(weight[rows].float() * inverse[rows, None]).clamp(-127, 127)
    return values, scale


def quantize_groups(weight, group_size=GROUP_SIZE):
    """(int8 values (rows, cols), float16 scales (rows, cols / group_size)): llama.cpp's Q8_0,
    number for number (its reference quantizer divides by the float32 scale, then stores the
    scale as float16)."""
    rows, cols = weight.shape
    if cols % group_size:
        raise ValueError(f"a row of {cols} numbers is not a whole number of groups of {group_size}")
    groups = weight.detach().float().reshape(rows, cols // group_size, group_size)
    scale = groups.abs().amax(dim=2) / 127
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    values = round_half_away(groups * inverse[..., None]).to(torch.int8)
    return values.reshape(rows, cols), scale.to(torch.float16)


def dequantize_rows(values, scale, dtype=torch.float32):
    """quantize_rows' numbers as a float matrix (or rows of one: any leading shape)."""
    return values.to(dtype) * scale.to(dtype)[..., None]


def row_scales_as_groups(scale, cols, group_size=GROUP_SIZE):
    """quantize_rows' scale per row as float16 scales per group of a row (all a row's groups
    alike): model.bin version 3's layout holding the numbers the model runs with."""
    groups = scale.float()[:, None].expand(-1, cols // group_size).to(torch.float16)
    assert torch.equal(groups.float(), scale.float()[:, None].expand_as(groups)), "a scale float16 cannot hold"
    return groups


def dequantize_groups(values, scales, group_size=GROUP_SIZE):
    rows, cols = values.shape
    groups = values.float().reshape(rows, cols // group_size, group_size) * scales.float()[..., None]
    return groups.reshape(rows, cols)


def weights_description(kind):
    """' in 8 bits (q8_0)' for a script's model line, or '' for float weights."""
    return f" in 8 bits ({kind})" if kind else ""


# Up to this many rows at a time go through the kernels. Measured on SmolLM2-135M (2 cores), one
# forward pass: 1 row 11 ms, 16 rows 44 ms, 64 rows 157 ms by our C kernel, against 82, 128 and
# 189 ms rebuilding the float matrices; past about 100 rows rebuilding is faster (512: 0.9 s
# against 1.5 s).
KERNEL_MAX_ROWS = 64
FALLBACK_MAX_ROWS = 16  # the same for PyTorch's int8 kernel, slower at many rows


class Int8Linear(nn.Module):
    """A Linear layer whose weight is int8 with one scale per output row. It takes and gives the
    activations' dtype, so the layers around it are unchanged."""

    def __init__(self, values, scale, bias=None):
        super().__init__()
        self.out_features, self.in_features = values.shape
        # the numbers are a (frozen) parameter, counted by num_params; a tied output layer is handed
        # the embedding's own parameter and scale, so the matrix is stored once
        self.weight_int8 = values if isinstance(values, nn.Parameter) else nn.Parameter(values, requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = bias
        if not self.weight_int8.is_contiguous():
            raise ValueError("Int8Linear needs its int8 matrix contiguous")  # (how the C kernel reads it)
        # What the C kernel reads: the int8 parameter itself (a module moved between devices keeps the
        # parameter object and swaps its memory) and a float32 copy of the scales. Kept outside
        # nn.Module's registries: reading a plain attribute costs 1.4 us less a product, and .to(dtype)
        # can never cast these scales.
        object.__setattr__(self, "kernel_operands", (self.weight_int8, scale.float().contiguous()))

    @classmethod
    def from_linear(cls, linear):
        values, scale = quantize_rows(linear.weight)
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return cls(values.to(linear.weight.device), scale.to(linear.weight.device), bias)

    def forward(self, x):
        # (written for few Python operations per call: a token of SmolLM2-135M makes 151 of them)
        rows = x.numel() // self.in_features
        if x.is_cpu and x.dtype is torch.float32 and rows <= KERNEL_MAX_ROWS:
            library = kernels.library()
            if library is not None:
                # a few rows (generating): reading the weights is the work, and int8 is a quarter of the bytes
                y = kernels.int8_matvec(library, x, *self.kernel_operands)
                return y if self.bias is None else y + self.bias
        x_rows = x.reshape(-1, self.in_features)
        if x.is_cpu and rows <= FALLBACK_MAX_ROWS and self.in_features % 16 == 0:
            # no C compiler here: PyTorch's int8 kernel, in bfloat16 (its CPU version reads 16
            # activations at a time and is wrong for rows of other lengths)
            y = torch._weight_int8pack_mm(x_rows.to(torch.bfloat16).contiguous(), self.weight_int8, self.scale).to(x.dtype)
        else:
            # many rows (reading a prompt): arithmetic is the work, so the float matrix is rebuilt once
            # for all the rows (this is also the path for other devices)
            y = F.linear(x_rows, dequantize_rows(self.weight_int8, self.scale, x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    """The token embedding as int8 rows with one scale each: a token's vector is its row times
    its scale. With tied embeddings the output layer (an Int8Linear) shares these numbers."""

    def __init__(self, embedding):
        super().__init__()
        values, scale = quantize_rows(embedding.weight)
        self.weight_int8 = nn.Parameter(values.to(embedding.weight.device), requires_grad=False)
        self.register_buffer("scale", scale.to(embedding.weight.device))
        self.dtype = embedding.weight.dtype  # the activations' dtype, as the float embedding gave

    @property
    def weight(self):
        """The table as the model sees it (values times scales), for code that reads the embedding
        (explain.py's nearest tokens): a float copy, made on each call."""
        return dequantize_rows(self.weight_int8, self.scale, self.dtype)

    def forward(self, idx):
        return dequantize_rows(self.weight_int8[idx], self.scale[idx], self.dtype)


def quantize_model(model, kind):
    """Replace, in place, the token embedding and every Linear layer of a GPT by its 8-bit form
    (kind 'q8_0'; '' leaves the model as it is). For generation and evaluation only: the int8
    numbers have no gradients. Returns the model."""
    check_quant(kind)
    if not kind:
        return model
    tied = model.config.tie_embeddings
    model.wte = Int8Embedding(model.wte)
    if hasattr(model, "wpe"):
        # GPT-2's position table is read a row per token, never multiplied, so its bytes do not set
        # the speed: it stays float32, holding its 8-bit numbers (as model.bin version 3 stores it)
        with torch.no_grad():
            model.wpe.weight.copy_(dequantize_rows(*quantize_rows(model.wpe.weight)))
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and not (tied and child is model.lm_head):
                setattr(module, name, Int8Linear.from_linear(child))
    if tied:  # the output layer is the embedding's matrix: the same int8 numbers and scales
        model.lm_head = Int8Linear(model.wte.weight_int8, model.wte.scale)
    release_freed_memory()
    return model


def release_freed_memory():
    """Hand the float weights' freed memory back to the system. glibc's malloc keeps freed
    blocks for reuse, so without this a quantized model holds as much memory as the float one
    (bench.py measured 1.2 GB against 0.46 GB after trimming, for SmolLM2-135M)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # another C library (musl): nothing to trim this way
            pass
