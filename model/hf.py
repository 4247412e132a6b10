"""Hugging Face models in and out: GPT-2 and Llama-family weights become our GPT, and our GPT
becomes a folder that transformers' from_pretrained loads.

An imported model is converted once, here, into our own model and tokenizer objects, so
everything downstream (sample.py, explain.py, export.py, run.py, fine-tuning) works on it
unchanged. Only two transformers classes are needed for the families people run on a laptop:
GPT2LMHeadModel (GPT-2 124M to 1.5B) and LlamaForCausalLM (SmolLM/SmolLM2, TinyLlama,
Llama 2 and 3.x). Everything is read from plain files (config.json, *.safetensors,
tokenizer.json); transformers itself is never imported, so the runtime needs only
safetensors, tokenizers and huggingface_hub.
"""

import json
import os
import re

import torch

from model.errors import UserError
from model.files import atomic_write
from model.gpt import GPT, GPTConfig
from model.tokenizer import hf_tokenizer, tokenizer_json

SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM")
# what a download fetches: the model and its tokenizer, never other formats (.bin, .onnx, .gguf)
TOKENIZER_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja"]
HUB_FILES = TOKENIZER_FILES + ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"]
# GPT-2's sizes by their short names, as OpenAI's weights are named on the hub today
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def hub_name(spec: str) -> str:
    """The hub id of a short GPT-2 name (gpt2 -> openai-community/gpt2); anything else as it is.
    One name for one model: the download cache is keyed by it."""
    return f"openai-community/{spec}" if spec in GPT2_SIZES else spec


# ---- where the files are ------------------------------------------------------------------

def resolve_hf_folder(spec: str, tokenizer_only: bool = False) -> str:
    """A local folder as it is, or a hub id ("owner/name") as the folder of its cached download
    (with tokenizer_only, just the config and tokenizer files: no weights for data preparation).

    The download happens once, into the standard Hugging Face cache (~/.cache/huggingface),
    so the model works offline afterwards and is shared with every other tool using that cache."""
    if os.path.isdir(spec):
        return spec
    spec = hub_name(spec)
    files = TOKENIZER_FILES if tokenizer_only else HUB_FILES
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip(os.sep).replace("/", "", 1) \
            or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec):
        raise UserError(f"no folder {spec} (give hf:<local folder> or hf:<owner>/<name> of a hub model)")
    from huggingface_hub import snapshot_download

    try:  # already downloaded: no network at all
        folder = snapshot_download(spec, allow_patterns=files, local_files_only=True)
        # (a folder that data preparation fetched holds the tokenizer but not the weights)
        if tokenizer_only or any(os.path.exists(os.path.join(folder, name)) for name in
                                 ("model.safetensors", "model.safetensors.index.json")):
            return folder
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"{spec} is not in the Hugging Face cache and HF_HUB_OFFLINE is set "
                        "(download it once online, or pass hf:<local folder>)")
    try:
        # a short etag timeout: without a network the user hears so in seconds, not minutes
        return snapshot_download(spec, allow_patterns=files, etag_timeout=5)
    except Exception as e:  # network down, no such repository, gated model, disk full...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot download {spec} from the Hugging Face hub ({type(e).__name__}: {reason}); "
                        "check the network and the name, or pass hf:<local folder>") from None


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"no {os.path.basename(path)} in {os.path.dirname(path)} "
                        "(is this a Hugging Face model folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


# ---- config.json -> GPTConfig -------------------------------------------------------------

def gpt_config(hf: dict) -> GPTConfig:
    """Our config from transformers' config.json, refusing whatever our model would not compute
    exactly (so an imported model never runs quietly wrong)."""
    architecture = (hf.get("architectures") or [None])[0]
    if architecture not in SUPPORTED:
        raise UserError(f"unsupported architecture {architecture!r}: supported are {', '.join(SUPPORTED)}")
    try:
        if architecture == "GPT2LMHeadModel":
            if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise UserError(f"unsupported GPT-2 activation_function {hf['activation_function']!r} (gelu_new only)")
            if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
                raise UserError("unsupported GPT-2 attention scaling (only 1/sqrt(head size))")
            return GPTConfig(arch="gpt2", vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                             n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                             mlp_hidden=hf.get("n_inner") or 0, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                             tie_embeddings=True)  # transformers' GPT-2 always ties them
        for name in ("attention_bias", "mlp_bias"):
            if hf.get(name):
                raise UserError(f"unsupported Llama option {name}=true (our llama arch has no biases)")
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"unsupported Llama hidden_act {hf['hidden_act']!r} (silu only)")
        # transformers 5.x writes rope settings under rope_parameters; 4.x wrote rope_theta
        # at the top level and rope_scaling beside it (older files call rope_type "type")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            rope_scaling = {"rope_type": "llama3", **{key: rope[key] for key in keys}}
        elif rope_type != "default":
            raise UserError(f"unsupported rope scaling {rope_type!r} (supported: none, llama3)")
        return GPTConfig(arch="llama", vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                         n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                         n_embd=hf["hidden_size"], n_kv_head=hf.get("num_key_value_heads") or 0,
                         head_size=hf.get("head_dim") or 0, mlp_hidden=hf["intermediate_size"],
                         norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
                         tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_scaling=rope_scaling)
    except KeyError as e:
        raise UserError(f"config.json lacks {e.args[0]!r}, which {architecture} needs") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"config.json does not describe a model we can build: {e}") from None


# ---- parameter names: ours <-> transformers' ------------------------------------------------

def hf_names(config: GPTConfig) -> dict:
    """Each of our parameters -> the transformers tensor(s) it is made of. GPT-2's Conv1D
    layers store their weight as (in, out), the transpose of nn.Linear's (out, in): those are
    marked "T". Llama keeps q, k and v apart; we stack them into c_attn's rows."""
    names = {}
    if config.arch == "gpt2":
        names["wte.weight"], names["wpe.weight"] = ["transformer.wte.weight"], ["transformer.wpe.weight"]
        for i in range(config.n_layer):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for part in ("ln_1", "ln_2"):
                for kind in ("weight", "bias"):
                    names[ours + f"{part}.{kind}"] = [theirs + f"{part}.{kind}"]
            for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                names[ours + layer + ".weight"] = [theirs + layer + ".weight", "T"]
                names[ours + layer + ".bias"] = [theirs + layer + ".bias"]
        names["ln_f.weight"], names["ln_f.bias"] = ["transformer.ln_f.weight"], ["transformer.ln_f.bias"]
        return names
    names["wte.weight"] = ["model.embed_tokens.weight"]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        names[ours + "ln_1.weight"] = [theirs + "input_layernorm.weight"]
        names[ours + "ln_2.weight"] = [theirs + "post_attention_layernorm.weight"]
        names[ours + "attn.c_attn.weight"] = [theirs + f"self_attn.{p}_proj.weight" for p in "qkv"]
        names[ours + "attn.c_proj.weight"] = [theirs + "self_attn.o_proj.weight"]
        names[ours + "mlp.c_gate.weight"] = [theirs + "mlp.gate_proj.weight"]
        names[ours + "mlp.c_fc.weight"] = [theirs + "mlp.up_proj.weight"]
        names[ours + "mlp.c_proj.weight"] = [theirs + "mlp.down_proj.weight"]
    names["ln_f.weight"] = ["model.norm.weight"]
    if not config.tie_embeddings:
        names["lm_head.weight"] = ["lm_head.weight"]
    return names


# ---- reading weights ------------------------------------------------------------------------

class WeightFiles:
    """The tensors of a model folder by name: model.safetensors, a sharded index of them, or
    (only if there is no safetensors file) pytorch_model.bin read with weights_only=True."""

    def __init__(self, folder):
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        legacy = os.path.join(folder, "pytorch_model.bin")
        self.torch_state = None
        if os.path.exists(single):
            self.file_of = {name: single for name in self._safetensors_names(single)}
        elif os.path.exists(index):
            weight_map = read_json(index).get("weight_map", {})
            self.file_of = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
            for shard in set(self.file_of.values()):
                self._safetensors_names(shard)  # every shard present and readable, before any work
        elif os.path.exists(legacy):
            try:  # mmap: the tensors stay in the file until copied into the model
                self.torch_state = torch.load(legacy, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise UserError(f"{legacy} is not a readable weights file ({str(e).splitlines()[0][:200]})") from None
            self.file_of = {name: legacy for name in self.torch_state}
        else:
            raise UserError(f"no model.safetensors (or model.safetensors.index.json) in {folder}")
        # GPT-2's files on the hub name tensors without the "transformer." prefix
        for name in list(self.file_of):
            self.file_of.setdefault(f"transformer.{name}", self.file_of[name])

    @staticmethod
    def _safetensors_names(path):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        except FileNotFoundError:
            raise UserError(f"missing weights file {path}") from None
        except Exception as e:  # safetensors reports a truncated or damaged file here
            raise UserError(f"{path} is not a readable safetensors file ({str(e)[:200]})") from None

    def get(self, name):
        if name not in self.file_of:
            raise UserError(f"the weights in {self.folder} have no tensor {name}")
        if self.torch_state is not None:
            key = name if name in self.torch_state else name.removeprefix("transformer.")
            return self.torch_state[key]
        from safetensors import safe_open

        key = name
        try:
            # One file opening per tensor: the memory map, and the pages it read, are let go
            # after each copy, so importing needs little more memory than the model itself.
            with safe_open(self.file_of[name], framework="pt") as f:
                if key not in f.keys():
                    key = name.removeprefix("transformer.")
                return f.get_tensor(key)
        except Exception as e:
            raise UserError(f"cannot read tensor {name} from {self.file_of[name]} ({str(e)[:200]})") from None


def load_hf_model(folder: str):
    """(our GPT in float32 on the CPU, its tokenizer) from a transformers model folder."""
    if not os.path.isdir(folder):
        raise UserError(f"no folder {folder}")
    config = gpt_config(read_json(os.path.join(folder, "config.json")))
    tokenizer = hf_tokenizer(folder)
    weights = WeightFiles(folder)
    model = GPT.uninitialised(config)  # filled tensor by tensor from the files below
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ours, theirs in hf_names(config).items():
            target, row = params[ours], 0
            transpose = theirs[-1] == "T"
            parts = theirs[:-1] if transpose else theirs
            for name, rows in zip(parts, qkv_rows(config) if len(parts) == 3 else [target.shape[0]]):
                tensor = weights.get(name)
                if transpose:
                    tensor = tensor.t()
                expected = (rows, *target.shape[1:])
                if tuple(tensor.shape) != expected:
                    raise UserError(f"tensor {name} has shape {tuple(tensor.shape)} but config.json says "
                                    f"{expected}: the weights do not match the config")
                target[row:row + rows].copy_(tensor)  # converts bf16/fp16 files to float32 here
                row += rows
    return model.eval(), tokenizer


def qkv_rows(config):
    """Rows of c_attn that are the queries, the keys and the values."""
    return [config.n_head * config.head_size, config.n_kv_head * config.head_size, config.n_kv_head * config.head_size]


# ---- writing a transformers folder ----------------------------------------------------------

def hf_config(model, tokenizer) -> dict:
    c = model.config
    default_activation = "gelu" if c.arch == "gpt2" else "swiglu"
    if c.qk_norm or c.logit_softcap or c.mlp_activation != default_activation:
        raise UserError("transformers' GPT-2 and Llama classes have no qk_norm, logit_softcap or "
                        f"{c.mlp_activation} MLP: this model can be exported for run.py (--format=bin), not as hf")
    common = {"vocab_size": c.vocab_size, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
              "torch_dtype": "float32"}
    if c.arch == "gpt2":
        if not c.tie_embeddings or c.head_size * c.n_head != c.n_embd or c.n_kv_head != c.n_head:
            raise UserError("transformers' GPT-2 needs tied embeddings, n_kv_head = n_head and "
                            "head_size = n_embd / n_head; this model has other shapes")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": c.block_size,
                "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": c.mlp_hidden,
                "activation_function": "gelu_new", "layer_norm_epsilon": c.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True, **common}
    # transformers 4.x's way of writing rope settings, which 5.x reads as well
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.n_embd,
            "intermediate_size": c.mlp_hidden, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head, "head_dim": c.head_size, "hidden_act": "silu",
            "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
            "rope_scaling": c.rope_scaling, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": c.tie_embeddings, **common}


def hf_state_dict(model) -> dict:
    """Our parameters under transformers' names and layouts (the inverse of load_hf_model)."""
    c = model.config
    state = model.state_dict()
    out = {}
    for ours, theirs in hf_names(c).items():
        tensor = state[ours].detach().to(torch.float32)
        if ours in ("wte.weight", "lm_head.weight"):
            tensor = tensor[:c.vocab_size]  # padded rows exist only for fast matmuls
        if theirs[-1] == "T":
            out[theirs[0]] = tensor.t()
            continue
        for name, part in zip(theirs, tensor.split(qkv_rows(c)) if len(theirs) > 1 else [tensor]):
            out[name] = part
    return {name: owned(tensor) for name, tensor in out.items()}


def owned(tensor):
    """safetensors stores only tensors that own their memory: transposes and slices get a copy,
    whole parameters are written as they are (exporting a big model needs little extra memory)."""
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()  # a slice of a bigger tensor (c_attn's q/k/v, unpadded embedding rows)
    return tensor


def save_hf_model(model, tokenizer, folder: str):
    """config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    generation_config.json: what transformers' AutoModelForCausalLM and AutoTokenizer load."""
    import safetensors.torch

    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--output={folder} is a file; give a folder name for the Hugging Face model")
    # everything is computed before the first file is written: an error leaves nothing behind
    config = hf_config(model, tokenizer)
    weights = hf_state_dict(model)
    token_name = lambda id: None if id is None else tokenizer.token_bytes(id).decode("utf-8", errors="replace")
    files = {
        "config.json": config,
        "generation_config.json": {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id},
        "tokenizer.json": tokenizer_json(tokenizer),
        # the tokenizer.json alone defines the tokenizer: no class that would rebuild it its own way
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.config.block_size,
                                  "bos_token": token_name(tokenizer.bos_id), "eos_token": token_name(tokenizer.eos_id),
                                  "clean_up_tokenization_spaces": False,
                                  **({"chat_template": tokenizer.chat_template} if tokenizer.chat_template else {})},
    }
    with atomic_write(os.path.join(folder, "model.safetensors")) as f:
        # safetensors writes the file itself, tensor by tensor, by name: the temporary file's
        safetensors.torch.save_file(weights, f.name, metadata={"format": "pt"})
    for name, content in files.items():
        with atomic_write(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
