"""The files besides the weights that make a Hugging Face folder load with ``AutoTokenizer`` and
``generate``: ``generation_config.json`` and, from a ``tokenizer.model``, the tokenizer files with
the Llama 3 chat template."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..model import ModelArgs
from ..tokenizer import PAT_STR, STOP_TOKENS, Tokenizer
from .hf import BOS, EOS, SPECIAL_IDS, max_positions

__all__ = ["LLAMA3_CHAT_TEMPLATE", "write_hf_extras"]

logger = logging.getLogger(__name__)

# The Llama 3 chat format as a Jinja template (plain messages): <|begin_of_text|>, then per message
# a header with the role, the stripped content and <|eot_id|>; an open assistant header on request.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim }}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_hf_extras(out_dir: str | Path, args: ModelArgs, tokenizer_model: Path | None) -> list[str]:
    """Write ``generation_config.json`` (eos = the stop tokens) and, from ``tokenizer_model``,
    ``tokenizer.json``, ``tokenizer_config.json`` (with the Llama 3 chat template) and
    ``special_tokens_map.json``, so ``AutoTokenizer`` + ``AutoModelForCausalLM`` load the folder.
    Building ``tokenizer.json`` needs transformers; without it that one file is skipped with a
    warning saying how to add it. Returns the names written."""
    out = Path(out_dir)
    written = ["generation_config.json"]
    _write_json(out / "generation_config.json", {"bos_token_id": SPECIAL_IDS[BOS],
                                                 "eos_token_id": [SPECIAL_IDS[t] for t in STOP_TOKENS],
                                                 "do_sample": True, "temperature": 0.6, "top_p": 0.9})
    if tokenizer_model is None:
        logger.warning("no tokenizer.model in the source: the Hugging Face folder has no tokenizer files "
                       "(copy tokenizer.model in and convert again to get them)")
        return written
    try:
        tok = Tokenizer(tokenizer_model)
    except (OSError, ValueError) as e:
        logger.warning("no tokenizer files for transformers written: %s", e)
        return written
    if tok.n_words != args.vocab_size:
        logger.warning("tokenizer.model has %d tokens but the model %d; writing its files anyway",
                       tok.n_words, args.vocab_size)
    _write_json(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS})
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS,
        "eos_token": EOS, "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": max_positions(args),
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    })
    written += ["special_tokens_map.json", "tokenizer_config.json"]
    try:
        from tokenizers import processors
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        logger.warning("tokenizer.json not written: building it from tokenizer.model needs transformers "
                       "(`pip install transformers`, then convert again); the other files are complete")
        return written
    specials = sorted(tok.special_tokens, key=tok.special_tokens.__getitem__)  # in id order
    converted = TikTokenConverter(vocab_file=str(tokenizer_model), pattern=PAT_STR,
                                  extra_special_tokens=specials).converted()
    converted.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, tok.bos_id)]),
    ])
    converted.save(str(out / "tokenizer.json"))
    return [*written, "tokenizer.json"]
