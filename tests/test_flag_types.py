"""Flags and config values are their type (issue 24): a string where a bool is documented is
refused by name (``"false"`` is truthy), and numbers that must be positive are checked, in the
library, in config files and in every CLI."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from llama3.checkpoint import ConfigValueError, read_model_args, write_random_checkpoint
from llama3.checkpoint import inspect_checkpoint as inspect
from llama3.errors import InvalidArgumentError
from llama3.generation import Llama
from llama3.model import ModelArgs

REPO = Path(__file__).resolve().parents[1]
TINY = dict(dim=64, n_layers=1, n_heads=4, vocab_size=256, multiple_of=16)


@pytest.mark.parametrize(("field", "value"), [
    ("tie_word_embeddings", "false"),
    ("tie_word_embeddings", 0),
    ("use_scaled_rope", "no"),
    ("use_scaled_rope", None),
    ("rope_original_max_seq_len", 0),
    ("rope_original_max_seq_len", -8192),
    ("rope_original_max_seq_len", "8192"),
    ("rope_original_max_seq_len", 8192.5),
    ("rope_scale_factor", math.nan),
    ("rope_scale_factor", 0),
    ("rope_low_freq_factor", -1.0),
    ("rope_high_freq_factor", math.inf),
    ("norm_eps", math.nan),
    ("rope_theta", "500000"),
    ("ffn_dim_multiplier", -1.3),
])
def test_model_args_refuse_wrong_types_by_name(field: str, value) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        ModelArgs(**TINY, **{field: value})


def test_model_args_accept_their_types() -> None:
    args = ModelArgs(**TINY, tie_word_embeddings=True, use_scaled_rope=True, rope_original_max_seq_len=8192,
                     rope_scale_factor=32, ffn_dim_multiplier=1.3)
    assert args.tie_word_embeddings is True
    assert args.rope_scale_factor == 32


@pytest.mark.parametrize(("key", "value"), [("tie_word_embeddings", "false"), ("use_scaled_rope", "true"),
                                        ("rope_original_max_seq_len", 0), ("rope_scale_factor", -8)])
def test_params_json_values_are_their_type(tmp_path: Path, key: str, value) -> None:
    ckpt = write_random_checkpoint(tmp_path / "c", "test-gqa", dtype=torch.float32)
    params = json.loads((ckpt / "params.json").read_text())
    params[key] = value
    (ckpt / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigValueError, match=key):
        read_model_args(inspect(ckpt))


def test_hf_config_values_are_their_type(tmp_path: Path) -> None:
    ckpt = write_random_checkpoint(tmp_path / "c", "test-gqa", format="hf", dtype=torch.float32)
    config = json.loads((ckpt / "config.json").read_text())
    for key, value, rope in [("tie_word_embeddings", "false", False),
                             ("original_max_position_embeddings", 0, True),
                             ("original_max_position_embeddings", -1, True)]:
        changed = json.loads(json.dumps(config))
        if rope:
            changed["rope_scaling"] = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, key: value}
        else:
            changed[key] = value
        (ckpt / "config.json").write_text(json.dumps(changed))
        with pytest.raises(ConfigValueError, match=key):
            read_model_args(inspect(ckpt))


@pytest.mark.parametrize(("flag", "value"), [("compile", "no"), ("compile", "False"), ("fbgemm", "false"),
                                         ("fbgemm", 0), ("verbose", "yes")])
def test_build_refuses_non_bool_flags_before_loading(tmp_path: Path, flag: str, value) -> None:
    with pytest.raises(InvalidArgumentError, match=flag):
        Llama.build(tmp_path / "never-read", **{flag: value})


def test_llama_refuses_non_bool_compile(make_tiny_model, llama3_tokenizer) -> None:
    with pytest.raises(InvalidArgumentError, match="compile"):
        Llama(make_tiny_model("test-chat"), llama3_tokenizer, compile="no")


@pytest.mark.parametrize("value", ["no", "false", "0"])
def test_example_script_refuses_a_bool_flag_with_a_word(value: str, tmp_path: Path, monkeypatch,
                                                        capsys) -> None:
    spec = importlib.util.spec_from_file_location("example_text_completion",
                                                  REPO / "scripts" / "example_text_completion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr("llama3.generation.Llama.build", lambda *a, **k: pytest.fail("must not load"))
    assert module.fire_strict(module.main, [str(tmp_path), f"--compile={value}"], prog="x") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "--compile" in err[0]
