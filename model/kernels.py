"""Generation's C code (kernels.c): built on first use, called through ctypes.

Generating a token multiplies one vector by every weight matrix: the work is reading the
matrices, so a token should take as long as reading them. Two things in PyTorch stand between:
its int8 kernel waits on its own arithmetic on a CPU (one token of SmolLM2-135M's products: 18.2
ms on one core, 9.7 ms on two, against 7.3 and 5.2 ms for ours), and a token is about a thousand
small operations at microseconds of set-up each (6 ms a token, more than reading the 8-bit
weights). So kernels.c has the 8-bit product (int8_matvec, for Int8Linear's few rows) and a whole
token through the model (decode_token, for GPT.generate and chat.py: see Decoder).

The C file is compiled once per machine with the system's C compiler (`cc`, or $CC) into
~/.cache/gpt-from-scratch/ (or $XDG_CACHE_HOME's), about half a second. Where there is no
compiler, or it fails, `library()` returns None and generation runs in PyTorch instead: slower,
never wrong.
"""

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile

import torch
import torch.nn as nn

from model.files import atomic_write

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.c")
# tried in order: threads and this processor's vector instructions, then without threads (a
# compiler without OpenMP, as Apple's clang), then the plain C any compiler builds
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-march=native"), ("-O3",))


def cache_folder():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt-from-scratch")


def build(flags, folder=None):
    """Compile kernels.c with these flags into folder (default: cache_folder()); the path of
    the shared library, or None if the compiler is missing or fails. Its name holds a hash of the
    source, the compiler, the flags and the machine: a changed file, or a home folder shared by
    machines with other processors (-march=native), builds anew. None too if the folder cannot be
    written."""
    compiler = os.environ.get("CC") or "cc"
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                     platform.node().encode(), platform.machine().encode()])).hexdigest()[:16]
    path = os.path.join(folder or cache_folder(), f"kernels-{key}.so")
    if os.path.exists(path):
        return path
    with tempfile.TemporaryDirectory() as scratch:
        built = os.path.join(scratch, "kernels.so")
        try:
            subprocess.run([compiler, *flags, "-shared", "-fPIC", SOURCE, "-o", built, "-lm"],
                           check=True, capture_output=True, timeout=300)
        except (OSError, subprocess.SubprocessError):  # no such compiler, or it refused the flags
            return None
        try:
            with open(built, "rb") as f, atomic_write(path) as out:  # (another process may be building it too)
                out.write(f.read())
        except OSError:  # a cache folder that cannot be written
            return None
    return path


class Library:
    """The built kernels.c: its two functions with their C signatures declared, and how it was built."""

    def __init__(self, path, threads):
        library = ctypes.CDLL(path)
        self.int8_matvec = library.int8_matvec
        self.int8_matvec.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
        self.int8_matvec.restype = None
        self.decode_token = library.decode_token
        self.decode_token.argtypes = [ctypes.POINTER(Model), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.decode_token.restype = None
        library.kernels_instructions.restype = ctypes.c_char_p
        self.instructions = library.kernels_instructions().decode()  # "avx2" or "portable"
        self.threads = threads  # built with OpenMP


_library = None  # the loaded Library; False once building it failed (not tried again)


def library():
    """kernels.c, built and loaded on first call; None where it cannot be built."""
    global _library
    if _library is None:
        _library = False
        for flags in FLAG_SETS:
            path = build(flags)
            if path is not None:
                try:
                    _library = Library(path, threads="-fopenmp" in flags)
                except OSError:  # built, but not loadable here (a cache folder mounted noexec)
                    pass
                break
    return _library or None


def int8_matvec(library, x, values, scale):
    """x (..., in) float32 times the int8 matrix values (out, in) with a float32 scale (out,) per
    row: (..., out) float32. C reads raw memory, so the types and shapes are checked here;
    values and scale are a layer's fixed numbers (model/quant.py's Int8Linear checks their layout once)."""
    out_features, in_features = values.shape
    if x.dtype is not torch.float32 or x.shape[-1] != in_features:
        raise ValueError(f"int8_matvec takes float32 rows of {in_features} numbers, not {x.dtype} {tuple(x.shape)}")
    if values.dtype is not torch.int8 or scale.dtype is not torch.float32:  # (a model cast to float16 casts its scales)
        raise ValueError(f"int8_matvec takes int8 values and float32 scales, not {values.dtype} and {scale.dtype}")
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], out_features)
    library.int8_matvec(x.data_ptr(), values.data_ptr(), scale.data_ptr(), y.data_ptr(), x.numel() // in_features,
                        out_features, in_features)
    return y


# ---- one token through the whole model ----------------------------------------------------------
# kernels.c's structs, field for field: pointers into the model's own tensors, which C reads in place

class Matrix(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("out_features", ctypes.c_int64), ("in_features", ctypes.c_int64)]


class Norm(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("norm_1", Norm), ("qkv", Matrix), ("attn_proj", Matrix), ("norm_2", Norm),
                ("fc", Matrix), ("gate", Matrix), ("mlp_proj", Matrix)]


class Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("n_layer", "n_embd", "n_head", "n_kv_head", "head_size",
                                                   "mlp_hidden", "vocab_size")] + [
        ("activation", ctypes.c_int), ("qk_norm", ctypes.c_int),
        ("norm_eps", ctypes.c_float), ("logit_softcap", ctypes.c_float),
        ("embedding", Matrix), ("positions", ctypes.c_void_p), ("rope_cos", ctypes.c_void_p),
        ("rope_sin", ctypes.c_void_p), ("layers", ctypes.POINTER(Layer)), ("norm_f", Norm), ("lm_head", Matrix),
        ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p), ("max_length", ctypes.c_int64),
        ("scratch", ctypes.c_void_p)]


ACTIVATIONS = {"gelu": 0, "swiglu": 1, "relu2": 2}  # kernels.c's GELU, SWIGLU, RELU2


class NotForC(Exception):
    """What decode_token cannot run (see Decoder.make), said as "kernels.c does not run <this>"."""


def address(tensor, dtype=torch.float32):
    """The memory C reads: a contiguous CPU tensor of this dtype, else NotForC."""
    if tensor.device.type != "cpu":
        raise NotForC(f"weights on {tensor.device}")
    if tensor.dtype is not dtype:
        raise NotForC(f"{str(tensor.dtype).removeprefix('torch.')} weights")
    if not tensor.is_contiguous():
        raise NotForC("weights laid out for PyTorch's split products (GPT.use_cpu_decoding_layout)")
    return tensor.data_ptr()


class Decoder:
    """One new token's logits from kernels.c's decode_token, for one model and one KV cache: what
    generation runs for every token after the prompt on a CPU (the prompt itself, many rows at once,
    is arithmetic, which PyTorch does well). It reads the model's weights and writes the cache's
    keys and values in place, exactly where the PyTorch forward pass would, so the two can take
    turns on one cache (a prompt, then tokens, then a new turn's prompt).

    decode_token implements what the model's own modules compute in eval mode: both archs, grouped
    queries, qk_norm, logit_softcap, gelu / swiglu / relu2, float32 or 8-bit (Int8Linear) weights.
    Anything else (LoRA layers, bfloat16, another device, explain.py's recorded attention, weights
    laid out for PyTorch's split products) is refused, and generation stays in PyTorch.

    Made once per generation or conversation (its pointers are the weights and cache of that
    moment: a model moved, re-quantized or re-laid out needs a new Decoder)."""

    @classmethod
    def make(cls, model, kv_cache):
        """A Decoder, or None where the C code is not built or cannot run this model and cache."""
        return cls.make_or_say_why(model, kv_cache)[0]

    @classmethod
    def make_or_say_why(cls, model, kv_cache):
        """(a Decoder, "") or (None, why not)."""
        found = library()
        if found is None:
            return None, "no C compiler found for model/kernels.c"
        try:
            return cls(model, kv_cache, found), ""
        except NotForC as e:
            return None, f"model/kernels.c does not run {e}"

    def __init__(self, model, kv_cache, found):
        from model.gpt import Linear, RMSNorm
        from model.quant import Int8Embedding, Int8Linear

        c = model.config
        if model.training:
            raise NotForC("a model in training mode (dropout)")
        if kv_cache.keys.shape[1] != 1:
            raise NotForC("a batch of sequences")
        if c.mlp_activation not in ACTIVATIONS:
            raise NotForC(f"the {c.mlp_activation} activation")
        kept = []  # tensors made here that C reads: alive as long as the Decoder

        def matrix(layer, rows=None):
            if isinstance(layer, Int8Linear):
                values, scale = layer.kernel_operands
                weight, scale = address(values, torch.int8), address(scale)
            elif type(layer) in (Linear, nn.Linear):
                weight, scale = address(layer.weight), None
            else:  # a LoRA layer, or another kind this code does not know
                raise NotForC(f"a {type(layer).__name__} layer")
            bias = None if layer.bias is None else address(layer.bias)
            return Matrix(weight, scale, bias, rows or layer.out_features, layer.in_features)

        def norm(module):
            if type(module) is RMSNorm:
                return Norm(address(module.weight), None)
            if type(module) is nn.LayerNorm and module.weight is not None and module.bias is not None:
                return Norm(address(module.weight), address(module.bias))
            raise NotForC(f"a {type(module).__name__} norm")

        if isinstance(model.wte, Int8Embedding):
            scale = model.wte.scale.float().contiguous()
            kept.append(scale)
            embedding = Matrix(address(model.wte.weight_int8, torch.int8), address(scale), None, *model.wte.weight_int8.shape)
        elif type(model.wte) is nn.Embedding:
            embedding = Matrix(address(model.wte.weight), None, None, *model.wte.weight.shape)
        else:
            raise NotForC(f"a {type(model.wte).__name__} embedding")
        layers = (Layer * c.n_layer)()
        for index, block in enumerate(model.blocks):
            attn, mlp = block.attn, block.mlp
            if attn.record_attention:
                raise NotForC("recorded attention (explain.py)")
            gate = matrix(mlp.c_gate) if c.mlp_activation == "swiglu" else Matrix()
            layers[index] = Layer(norm(block.ln_1), matrix(attn.c_attn), matrix(attn.c_proj), norm(block.ln_2),
                                  matrix(mlp.c_fc), gate, matrix(mlp.c_proj))
        max_length = kv_cache.keys.shape[3]
        positions = rope_cos = rope_sin = None
        if c.arch == "gpt2":
            positions = address(model.wpe.weight)
        else:
            # RoPE's angles for every position the cache holds, made once: the numbers of rope_angles
            angles = torch.outer(torch.arange(max_length, dtype=torch.float32), model.rope_inv_freq.float())
            cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
            kept += [cos, sin]
            rope_cos, rope_sin = address(cos), address(sin)
        qkv_size = (c.n_head + 2 * c.n_kv_head) * c.head_size
        scratch = torch.empty(2 * c.n_embd + qkv_size + c.n_head * c.head_size + c.n_head * max_length
                              + 2 * c.mlp_hidden)
        kept.append(scratch)
        self.model_struct = Model(
            c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_size, c.mlp_hidden, c.vocab_size,
            ACTIVATIONS[c.mlp_activation], int(c.qk_norm), c.norm_eps, c.logit_softcap, embedding, positions,
            rope_cos, rope_sin, layers, norm(model.ln_f), matrix(model.lm_head, rows=c.vocab_size),
            address(kv_cache.keys), address(kv_cache.values), max_length, address(scratch))
        self.layers, self.kept, self.kv_cache = layers, kept, kv_cache  # (what C points into stays alive)
        self.decode_token, self.max_length, self.vocab_rows = found.decode_token, max_length, embedding.out_features
        self.vocab_size = c.vocab_size

    def __call__(self, token_id):
        """The logits (1, 1, vocab_size) after token_id, which takes the cache's next position."""
        position = self.kv_cache.length
        if not (0 <= position < self.max_length and 0 <= token_id < self.vocab_rows):  # (C checks nothing)
            raise ValueError(f"token {token_id} at position {position}: the cache holds {self.max_length} positions "
                             f"and the embedding {self.vocab_rows} tokens")
        logits = torch.empty(1, 1, self.vocab_size)
        self.decode_token(self.model_struct, token_id, position, logits.data_ptr())
        self.kv_cache.length = position + 1
        return logits


def generation_description(model, device, use_kv_cache=True):
    """How this model computes each new token here, for the scripts to say: in C, or in PyTorch
    and why (what an 8-bit model's products then run on included)."""
    from model.gpt import KVCache
    from model.quant import Int8Linear

    quantized = any(isinstance(module, Int8Linear) for module in model.modules())
    if torch.device(device).type != "cpu":
        return f"in PyTorch on {device}" + (", each 8-bit matrix rebuilt in float as it multiplies" if quantized else "")
    if not use_kv_cache:
        return "in PyTorch, the whole context again for each token (no KV cache)"
    decoder, why = Decoder.make_or_say_why(model, KVCache(model.config, 1, "cpu", torch.float32, 1))
    if decoder is None:
        products = "; 8-bit products by " + ("PyTorch's int8 kernel" if library() is None else "model/kernels.c")
        return f"in PyTorch ({why}{products if quantized else ''})"
    threads = f"{torch.get_num_threads()} OpenMP threads" if library().threads else "one thread"
    return f"each in C (model/kernels.c, {library().instructions}, {threads})"
