"""A llama-architecture GGUF file as our model: ``ModelArgs`` from its metadata, and its tensors,
dequantized to float32, in our (Meta's) names. The inverse of ``gguf_writer.py``.

llama.cpp's converter stores q and k in Meta's interleaved (adjacent-pair) RoPE layout (it undoes
Hugging Face's rotate-half permutation), which is ours, so every matrix is taken as it is: GGUF's
shape [in, out] is numpy's [out, in], torch's ``nn.Linear`` layout. A quantized file's matrices
(Q4_1, Q8_0...) are dequantized with ``gguf.quants``: the float model this returns is the one the
file's numbers mean, not the model it was quantized from.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llama3.errors import LlamaError
from llama3.model import ModelArgs

# GGUF tensor name (after "blk.N.") -> ours (after "layers.N.").
BLOCK_NAMES = {
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
}
TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}


class GGUFModelError(LlamaError, ValueError):
    """The GGUF file is not a model this mapping can represent (another architecture, a feature
    our model lacks, an unexpected tensor)."""


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """A scalar metadata value (``default`` when the key is absent)."""
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise GGUFModelError(f"the GGUF file has no {key!r} metadata; it is needed to build the model")
        return default
    value = field.parts[field.data[-1]]
    return bytes(value).decode() if field.types and field.types[0].name == "STRING" else value[0].item()


def _float32_decimal(x: float) -> float:
    """A float32 metadata value as the shortest decimal with the same float32 (1e-5 stays 1e-5, not
    9.99999974e-06): what the writer most likely meant."""
    import numpy as np

    return float(str(np.float32(x)))


def _ffn_rule(dim: int, hidden: int) -> dict[str, Any]:
    """``multiple_of`` / ``ffn_dim_multiplier`` that make ModelArgs compute ``hidden``."""
    for multiple_of, multiplier in ((256, None), (hidden, None), (hidden, hidden / int(8 * dim / 3))):
        args = ModelArgs(dim=dim, n_heads=1, n_layers=1, multiple_of=multiple_of,
                         ffn_dim_multiplier=multiplier)
        if args.ffn_hidden_dim == hidden:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    raise GGUFModelError(f"no multiple_of/ffn_dim_multiplier gives a feed-forward width {hidden} at "
                         f"dim {dim}")


def gguf_model_args(reader: Any, **overrides: Any) -> ModelArgs:
    """ModelArgs of the llama-architecture GGUF file ``reader`` (a ``gguf.GGUFReader``) reads;
    ``overrides`` (``max_seq_len=``, ``max_batch_size=``) are passed on."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFModelError(f"the GGUF file's architecture is {arch!r}; only 'llama' maps onto this model")
    tensors = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise GGUFModelError("the GGUF file has rope_freqs.weight (Llama 3.1 RoPE scaling); reading it is "
                             "not supported: use a model without RoPE scaling")
    dim = _field(reader, f"{arch}.embedding_length")
    n_heads = _field(reader, f"{arch}.attention.head_count")
    rope_dims = _field(reader, f"{arch}.rope.dimension_count", dim // n_heads)
    if rope_dims != dim // n_heads or dim % n_heads:
        raise GGUFModelError(f"RoPE over {rope_dims} of each head's {dim / n_heads:g} dimensions: this model "
                             "rotates whole heads of dim / n_heads")
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = int(embedding.shape[-1])  # GGUF shapes list the fastest-varying dimension first
    declared = _field(reader, f"{arch}.vocab_size", vocab)
    if declared != vocab:
        raise GGUFModelError(f"{arch}.vocab_size says {declared} but token_embd.weight has {vocab} rows")
    params = dict(dim=dim, n_layers=_field(reader, f"{arch}.block_count"), n_heads=n_heads,
                  n_kv_heads=_field(reader, f"{arch}.attention.head_count_kv", n_heads), vocab_size=vocab,
                  norm_eps=_float32_decimal(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
                  rope_theta=_float32_decimal(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
                  tie_word_embeddings="output.weight" not in tensors,
                  **_ffn_rule(dim, _field(reader, f"{arch}.feed_forward_length")))
    return ModelArgs(**params, **overrides)


def our_name(gguf_name: str) -> str:
    """Our state-dict name for a GGUF tensor name."""
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in BLOCK_NAMES:
        return f"layers.{int(layer)}.{BLOCK_NAMES[suffix]}"
    raise GGUFModelError(f"unexpected tensor {gguf_name!r} in a llama-architecture GGUF file")


def gguf_state_dict(reader: Any) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized to float32, in our names (a tied model has no
    ``output.weight``: the model ties it to the embedding)."""
    from gguf.quants import dequantize

    sd = {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        if math.prod(shape) != values.size:
            raise GGUFModelError(f"{t.name}: {values.size} values for the shape {list(shape)}")
        sd[our_name(t.name)] = torch.from_numpy(values.reshape(shape).copy())
    return sd


def read_gguf(path: str, **overrides: Any) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """ModelArgs and float32 state dict (our names) of the llama-architecture GGUF file ``path``."""
    import gguf

    reader = gguf.GGUFReader(path)
    return gguf_model_args(reader, **overrides), gguf_state_dict(reader)
