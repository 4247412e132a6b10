"""The C product of the 8-bit model (int8_matvec.c): built on first use, called through ctypes.

Generating a token multiplies one vector by every weight matrix: the work is reading the
matrices, and int8 is a quarter of float32's bytes, but only if the arithmetic keeps up with
memory. PyTorch's int8 kernel does not on a CPU: its arithmetic is what it waits on (one token of
SmolLM2-135M's products: 18.2 ms on one core, 9.7 ms on two, against about 20 ms for float32's
four times the bytes). So the product is 75 lines of C instead, which turns each int8 into a
float32 in a register (7.3 ms on one core, 5.2 ms on two).

The C file is compiled once per machine with the system's C compiler (`cc`, or $CC) into
~/.cache/gpt-from-scratch/ (or $XDG_CACHE_HOME's), about a fifth of a second. Where there is no
compiler, or it fails, `kernel()` returns None and the 8-bit model multiplies with PyTorch's
kernel instead (model/quant.py): slower, never wrong. Nothing here is needed for float32 models.
"""

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile

import torch

from model.files import atomic_write

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "int8_matvec.c")
# tried in order: threads and this processor's vector instructions, then without threads (a
# compiler without OpenMP, as Apple's clang), then the plain C any compiler builds
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-march=native"), ("-O3",))

_kernel = None  # the loaded function; False once building it failed (not tried again)


def cache_folder():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt-from-scratch")


def build(flags, folder=None):
    """Compile int8_matvec.c with these flags into folder (default: cache_folder()); the path of
    the shared library, or None if the compiler is missing or fails. Its name holds a hash of the
    source, the compiler, the flags and the machine: a changed file, or a home folder shared by
    machines with other processors (-march=native), builds anew. None too if the folder cannot be
    written."""
    compiler = os.environ.get("CC") or "cc"
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(),
                                     platform.node().encode(), platform.machine().encode()])).hexdigest()[:16]
    path = os.path.join(folder or cache_folder(), f"int8_matvec-{key}.so")
    if os.path.exists(path):
        return path
    with tempfile.TemporaryDirectory() as scratch:
        built = os.path.join(scratch, "int8_matvec.so")
        try:
            subprocess.run([compiler, *flags, "-shared", "-fPIC", SOURCE, "-o", built],
                           check=True, capture_output=True, timeout=300)
        except (OSError, subprocess.SubprocessError):  # no such compiler, or it refused the flags
            return None
        try:
            with open(built, "rb") as f, atomic_write(path) as out:  # (another process may be building it too)
                out.write(f.read())
        except OSError:  # a cache folder that cannot be written
            return None
    return path


def load(path):
    """The int8_matvec function of a built library, with its C signature declared."""
    library = ctypes.CDLL(path)
    function = library.int8_matvec
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    function.restype = None
    library.int8_matvec_instructions.restype = ctypes.c_char_p
    function.instructions = library.int8_matvec_instructions().decode()  # "avx512", "avx2" or "portable"
    return function


def kernel():
    """The C product, built and loaded on first call; None where it cannot be built."""
    global _kernel
    if _kernel is None:
        _kernel = False
        for flags in FLAG_SETS:
            path = build(flags)
            if path is not None:
                try:
                    _kernel = load(path)
                except OSError:  # built, but not loadable here (a cache folder mounted noexec)
                    break
                _kernel.threads = "-fopenmp" in flags
                break
    return _kernel or None


def int8_matvec(function, x, values, scale):
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
    function(x.data_ptr(), values.data_ptr(), scale.data_ptr(), y.data_ptr(), x.numel() // in_features, out_features,
             in_features)
    return y
