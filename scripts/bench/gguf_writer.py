"""A llama3 model's weights as a GGUF file for llama.cpp, every matrix in one type."""

from __future__ import annotations

import torch

from llama3.model import ModelArgs, Transformer, rope_frequencies

GGUF_TYPES = ("BF16", "F16", "Q8_0", "Q4_0")


def write_gguf(model: Transformer, path: str, gguf_type: str) -> None:
    """``model``'s weights as a GGUF file for llama.cpp: every matrix (token embedding and output
    projection included) in ``gguf_type`` (BF16, F16, Q8_0 or Q4_0), norms in F32.

    Meta's layout is llama.cpp's (adjacent-pair RoPE), so no permutation; Llama 3.1 RoPE scaling
    goes in as llama.cpp's per-frequency divisors (``rope_freqs.weight``); the vocabulary is
    llama.cpp's "none" (ids in, logits out, no tokenizer needed). The model must hold float (or
    int8 weight-only) weights: write it before swapping in packed or quantized kernels."""
    import gguf
    import numpy as np

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    args = model.params
    qtype = getattr(gguf.GGMLQuantizationType, gguf_type)
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_vocab_size(args.vocab_size)
    w.add_tokenizer_model("none")
    w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{gguf_type}"))

    def matrix(name: str, t: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        t = t.float() if scale is None else t.float() * scale.float()[:, None]
        w.add_tensor(name, gguf.quants.quantize(t.numpy(), qtype), raw_dtype=qtype)

    def vector(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.float().numpy().astype(np.float32))

    if args.use_scaled_rope:
        plain = ModelArgs(**{**args.__dict__, "use_scaled_rope": False})
        vector("rope_freqs.weight", rope_frequencies(plain) / rope_frequencies(args))
    sd = model.state_dict()
    matrix("token_embd.weight", sd["tok_embeddings.weight"])
    vector("output_norm.weight", sd["norm.weight"])
    if not args.tie_word_embeddings:
        matrix("output.weight", sd["output.weight"], sd.get("output.scale"))
    names = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
             "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
             "feed_forward.w3": "ffn_up"}
    for i in range(args.n_layers):
        vector(f"blk.{i}.attn_norm.weight", sd[f"layers.{i}.attention_norm.weight"])
        vector(f"blk.{i}.ffn_norm.weight", sd[f"layers.{i}.ffn_norm.weight"])
        for ours, theirs in names.items():
            prefix = f"layers.{i}.{ours}"
            matrix(f"blk.{i}.{theirs}.weight", sd[f"{prefix}.weight"], sd.get(f"{prefix}.scale"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
