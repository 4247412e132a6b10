"""The sentence-embedding encoder: text -> one unit vector, so that similar texts point the same way.

It is the transformer block of model/gpt.py with three differences, all of BERT's making:
  - no causal mask: every token sees the whole text, before and after it (only padding is
    hidden), because the goal is to describe the text, not to predict its next token;
  - post-norm: x = norm(x + attention(x)), then x = norm(x + mlp(x)) (GPT-2 normalises before);
  - learned positions plus a "token type" row (BERT's sentence A/B), added to the token's row.
The vectors of the last layer are averaged over the text's tokens (or the first token, [CLS],
is taken, as the model's 1_Pooling/config.json says) and scaled to length 1: the dot product of
two embeddings is then their cosine similarity.

Loaded from a Hugging Face folder of the BERT family (all-MiniLM-L6-v2, bge-small-en-v1.5 and
their kind): config.json, model.safetensors and tokenizer.json; transformers is not needed.
"""

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.errors import UserError
from model.hf import WeightFiles, read_json, resolve_hf_folder

ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # -> F.gelu's approximate


@dataclass
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    n_layer: int
    n_head: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    gelu_approximate: str = "none"
    pooling: str = "mean"    # "mean" over the tokens, or "cls": the first token's vector
    max_tokens: int = 512     # longer texts are cut here (the model's trained length, often < max_positions)


class EncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        size = config.hidden_size
        self.n_head, self.approximate = config.n_head, config.gelu_approximate
        self.query, self.key, self.value = nn.Linear(size, size), nn.Linear(size, size), nn.Linear(size, size)
        self.attention_out = nn.Linear(size, size)
        self.attention_norm = nn.LayerNorm(size, eps=config.norm_eps)
        self.mlp_in = nn.Linear(size, config.intermediate_size)
        self.mlp_out = nn.Linear(config.intermediate_size, size)
        self.mlp_norm = nn.LayerNorm(size, eps=config.norm_eps)

    def forward(self, x, keep):
        B, T, C = x.shape

        def heads(t):  # (B, T, C) -> (B, heads, T, head size)
            return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

        # keep (B, 1, 1, T): True where a key is a real token; padding is never looked at
        y = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                                           attn_mask=keep)
        y = y.transpose(1, 2).reshape(B, T, C)
        x = self.attention_norm(x + self.attention_out(y))
        return self.mlp_norm(x + self.mlp_out(F.gelu(self.mlp_in(x), approximate=self.approximate)))


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_positions, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.embedding_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layer))

    def forward(self, ids, attention_mask):
        """ids, attention_mask (B, T) -> the last layer's vectors (B, T, hidden_size)."""
        T = ids.shape[1]
        # one text per row, all "sentence A": token type 0 everywhere
        x = self.word_embeddings(ids) + self.position_embeddings.weight[:T] + self.token_type_embeddings.weight[0]
        x = self.embedding_norm(x)
        keep = attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            x = layer(x, keep)
        return x

    def pool(self, hidden, attention_mask):
        """One unit vector per text: the mean of its tokens' vectors (or [CLS]'s), length 1."""
        if self.config.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = attention_mask[..., None].to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


# ---- transformers' names -> ours ------------------------------------------------------------

def weight_names(config):
    """Each of our parameters -> the name of its tensor in a BertModel's safetensors file."""
    names = {"word_embeddings.weight": "embeddings.word_embeddings.weight",
             "position_embeddings.weight": "embeddings.position_embeddings.weight",
             "token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
             "embedding_norm.weight": "embeddings.LayerNorm.weight",
             "embedding_norm.bias": "embeddings.LayerNorm.bias"}
    parts = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "attention_out": "attention.output.dense", "attention_norm": "attention.output.LayerNorm",
             "mlp_in": "intermediate.dense", "mlp_out": "output.dense", "mlp_norm": "output.LayerNorm"}
    for i in range(config.n_layer):
        for ours, theirs in parts.items():
            for kind in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{kind}"] = f"encoder.layer.{i}.{theirs}.{kind}"
    return names


def encoder_config(folder) -> EncoderConfig:
    hf = read_json(os.path.join(folder, "config.json"))
    if hf.get("model_type") != "bert":
        raise UserError(f"{folder} holds a {hf.get('model_type')!r} model; the embedder must be of the BERT "
                        "family (model_type bert: all-MiniLM-L6-v2, bge-small-en-v1.5, ...)")
    if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise UserError(f"unsupported BERT hidden_act {hf['hidden_act']!r} (supported: {', '.join(ACTIVATIONS)})")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"unsupported position_embedding_type {hf['position_embedding_type']!r} (absolute only)")
    pooling = read_json_if_present(os.path.join(folder, "1_Pooling", "config.json"))
    pooling = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
    trained_length = read_json_if_present(os.path.join(folder, "sentence_bert_config.json")).get("max_seq_length")
    try:
        max_positions = hf["max_position_embeddings"]
        return EncoderConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                             n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                             intermediate_size=hf["intermediate_size"], max_positions=max_positions,
                             type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=hf.get("layer_norm_eps", 1e-12),
                             gelu_approximate=ACTIVATIONS[hf.get("hidden_act", "gelu")], pooling=pooling,
                             max_tokens=min(trained_length or max_positions, max_positions))
    except KeyError as e:
        raise UserError(f"config.json lacks {e.args[0]!r}, which a BERT model needs") from None


def read_json_if_present(path):
    return read_json(path) if os.path.exists(path) else {}


def load_encoder(spec: str):
    """hf:<folder or owner/name> -> (Encoder in float32 on the CPU, its tokenizers.Tokenizer,
    description {"embedder", "path", "sha256" of its weights, "dim", "pooling", "max_tokens"})."""
    if not spec.startswith("hf:"):
        raise UserError(f"--embedder={spec}: give hf:<folder or owner/name> of a sentence-embedding model")
    folder = resolve_hf_folder(spec[len("hf:"):])
    config = encoder_config(folder)
    tokenizer = bert_tokenizer(folder, config.max_tokens)
    weights = WeightFiles(folder)
    # BertForMaskedLM and friends store the same tensors under "bert."
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights.file_of else ""
    model = Encoder(config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ours, theirs in weight_names(config).items():
            tensor = weights.get(prefix + theirs)
            if tuple(tensor.shape) != tuple(params[ours].shape):
                raise UserError(f"tensor {theirs} has shape {tuple(tensor.shape)} but config.json says "
                                f"{tuple(params[ours].shape)}: the weights do not match the config")
            params[ours].copy_(tensor)
    description = {"embedder": spec, "path": folder, "sha256": weights_sha256(model), "dim": config.hidden_size,
                   "pooling": config.pooling, "max_tokens": config.max_tokens}
    return model.eval(), tokenizer, description


def bert_tokenizer(folder, max_tokens):
    """The folder's tokenizer.json, adding [CLS] ... [SEP] itself, cut at max_tokens, not padded
    (padding is ours: to the longest text of each batch)."""
    import tokenizers

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise UserError(f"no tokenizer.json in {folder}")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:
        raise UserError(f"{path} is not a readable tokenizer.json: {str(e)[:200]}") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_tokens)
    return tokenizer


def weights_sha256(model):
    """One fingerprint of all the weights: an index refuses queries embedded by another model."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def embed(model, tokenizer, texts, batch_size=32, progress=None):
    """texts -> float32 array (len(texts), hidden_size) of unit rows, and how many texts were
    cut at the model's max_tokens. Texts are batched by length, so little is padding."""
    encodings = tokenizer.encode_batch(list(texts))
    lengths = [len(e.ids) for e in encodings]
    truncated = sum(1 for e in encodings if e.overflowing)
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        longest = max(lengths[i] for i in batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)  # padded with id 0 ([PAD] in BERT)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, :lengths[i]] = torch.tensor(encodings[i].ids)
            mask[row, :lengths[i]] = 1
        out[batch] = model.pool(model(ids, mask), mask).float().numpy()
        if progress is not None:
            progress.update(len(batch))
    return out, truncated

