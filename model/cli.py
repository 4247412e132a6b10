"""The small amount of command-line plumbing every script shares.

A config is a dataclass: each field has a type, a default and a one-line doc
(the `doc` metadata). `parse_config` layers a TOML preset and `--field=value`
flags on top of the defaults, converting each value to the field's type.
`main_guard` turns a UserError (bad input) into one line `error: ...` on stderr
and exit code 2, so users never see a traceback for their own mistakes.
"""

import dataclasses
import sys
import tomllib
import typing

from model.errors import UserError


def field(default, doc):
    """A dataclass field with a one-line description shown by --help."""
    return dataclasses.field(default=default, metadata={"doc": doc})


def _convert(name, text, kind):
    if kind is bool:
        lowered = str(text).lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--{name} expects true or false, got {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise UserError(f"--{name} expects an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--{name} expects a number, got {text!r}") from None
    return str(text)


def _check_toml_value(name, value, kind):
    # TOML already carries types; only accept what matches the field (ints may stand for floats).
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and isinstance(value, bool):
        return value
    if kind in (int, float, str) and isinstance(value, kind) and not isinstance(value, bool):
        return value
    raise UserError(f"{name} expects {kind.__name__}, got {value!r}")


def help_text(config_class, usage, values=None):
    """Every option with its type and doc. The value shown is the one that would run: the
    preset's or the flag's where one was given (`values`), else the field's default."""
    values = values or {}
    lines = [usage, "", "options (--name=value):"]
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        kind = hints[f.name].__name__
        option = f"--{f.name}={values.get(f.name, f.default)!r}"
        lines.append(f"  {option:<32} {kind:<5}  {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def parse_config(config_class, argv, usage, allow_preset=False, return_given=False):
    """Defaults <- optional TOML preset (first positional argument) <- --field=value flags.
    With return_given, also the names of the fields the preset or the flags set."""
    hints = typing.get_type_hints(config_class)
    names = {f.name for f in dataclasses.fields(config_class)}
    values = {}
    wants_help = any(a in ("-h", "--help") for a in argv)
    argv = [a for a in argv if a not in ("-h", "--help")]
    positional = [a for a in argv if not a.startswith("--")]
    flags = [a for a in argv if a.startswith("--")]
    if positional:
        if not allow_preset or len(positional) > 1:
            raise UserError(f"unexpected argument {positional[-1]!r} (options look like --name=value)")
        path = positional[0]
        try:
            with open(path, "rb") as f:
                preset = tomllib.load(f)
        except FileNotFoundError:
            raise UserError(f"config file {path} not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file {path} is not valid TOML: {e}") from None
        for key, value in preset.items():
            if key not in names:
                raise UserError(f"unknown field {key!r} in {path} (see --help)")
            values[key] = _check_toml_value(key, value, hints[key])
    for flag in flags:
        name, has_value, text = flag[2:].partition("=")
        name = name.replace("-", "_")
        if name not in names:
            raise UserError(f"unknown option --{name} (see --help)")
        if not has_value:
            if hints[name] is bool:
                text = "true"
            else:
                raise UserError(f"--{name} needs a value: --{name}=...")
        values[name] = _convert(name, text, hints[name])
    if wants_help:  # after the preset and the flags, so that --help shows what would run
        print(help_text(config_class, usage, values))
        sys.exit(0)
    config = config_class(**values)
    return (config, set(values)) if return_given else config


@dataclasses.dataclass
class SamplingOptions:
    """What every script that draws tokens from a model takes (sample.py, explain.py, chat.py): where
    the model is, what to feed it, and how to pick each next token."""
    out_dir: str = field("out", "folder with ckpt.pt (or the path of a checkpoint file)")
    init_from: str = field("resume", "resume (the checkpoint in --out_dir) | path/to/ckpt.pt | gpt2 | gpt2-medium | "
                           "gpt2-large | gpt2-xl | hf:<folder or owner/name> | path/to/model.gguf")
    prompt: str = field("", "text to continue, or FILE:path to read it from a file ('' = the prompt the model's "
                        "training run sampled from, else the start of a document)")
    temperature: float = field(0.8, "0 = greedy (always the most likely token); higher = more random")
    top_k: int = field(0, "sample only from the k most likely tokens (0 = all)")
    top_p: float = field(1.0, "sample only from the smallest set of tokens whose probability reaches p (1 = all)")
    max_new_tokens: int = field(500, "most tokens to generate (per sample, per reply)")
    seed: int = field(1337, "random seed: the same seed gives the same text")
    device: str = field("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = field("auto", "the weights' precision: auto (bfloat16 on CUDA, else float32) | float32 | bfloat16 | float16")
    quant: str = field("", "q8_0: weight matrices and embedding in 8 bits (int8, one scale per row), quantized at "
                       "load: a quarter of the memory, faster generation ('' = as --dtype)")


def check_sampling_options(cfg):
    from model.quant import check_quant

    check_quant(cfg.quant)
    if cfg.temperature < 0:
        raise UserError(f"--temperature must be 0 or more, got {cfg.temperature}")
    if cfg.top_k < 0 or not 0.0 < cfg.top_p <= 1.0:
        raise UserError("--top_k must be 0 or more and --top_p in (0, 1]")
    if cfg.max_new_tokens < 0:
        raise UserError("--max_new_tokens must be 0 or more")


def main_guard(main):
    """Run main(); turn bad input into `error: ...` + exit 2, Ctrl-C into exit 130."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


def resolve_device(name):
    """'auto' picks cuda, then Apple's mps, then cpu; an explicit name must be usable here."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name} but this machine has no CUDA GPU that torch can use (try --device=auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device=mps but Apple's Metal backend is not available here (try --device=auto)")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return name


def pick_dtype(name, device_type):
    """The torch dtype for --dtype: auto is bfloat16 on CUDA (float16 where the GPU lacks bf16),
    else float32."""
    import torch

    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UserError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    return dtypes[name]


def read_prompt(prompt, tokenizer, trained_prompt=None):
    """--prompt text, or FILE:path -> (token ids, the prompt's text). '' means the prompt the
    model's training run sampled from (its sample_prompt, chosen to show that data well: "def "
    for code, not the licence header most files start with), and, for a model without one,
    a fresh document: the start (or else end) of document token, else a line break."""
    if prompt.startswith("FILE:"):
        path = prompt[len("FILE:"):]
        try:
            with open(path, encoding="utf-8") as f:
                prompt = f.read()
        except FileNotFoundError:
            raise UserError(f"prompt file {path} not found") from None
        except UnicodeDecodeError:
            raise UserError(f"prompt file {path} is not UTF-8 text") from None
        if not prompt:
            raise UserError(f"prompt file {path} is empty")
    prompt = prompt or trained_prompt
    if prompt:
        return tokenizer.encode_prompt(prompt), prompt
    # a model that has a start-of-document token (Llama's BOS) was trained to begin with it
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if start is not None:
        return [start], ""
    try:
        return tokenizer.encode("\n"), "\n"  # a character model starts a document at a line break
    except UserError:
        raise UserError("this model has no start-of-document token: give a --prompt=TEXT") from None
