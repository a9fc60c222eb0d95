"""Non-finite weights are found at load, naming the file and the tensor (issue 24), even where a
kernel would hide them: one NaN in a ``wq`` weight gives finite logits on the CPU, so only the
load-time check can tell. Oracle: the same checkpoint without the bad values loads to exactly the
stored weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save_file

from llama3.checkpoint import NonFiniteWeightsError, load_model, write_random_checkpoint
from llama3.errors import LlamaError


def _load(path: Path, dtype: str = "fp32"):
    return load_model(path, max_seq_len=16, max_batch_size=1, device="cpu", dtype=dtype, verbose=False)


def _spoil_meta(path: Path, name: str, fill: float, rows: slice | None = None) -> None:
    sd = torch.load(path, weights_only=True)  # not memory-mapped: the file is rewritten below
    t = sd[name].clone()
    if rows is None:
        t.view(-1)[7] = fill
    else:
        t[rows] = fill
    sd[name] = t
    torch.save(sd, path)


@pytest.mark.parametrize("fill", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["layers.0.attention.wq.weight", "tok_embeddings.weight", "norm.weight",
                                  "layers.1.feed_forward.w2.weight"])
def test_meta_shard_with_a_bad_value_is_refused_by_name(tmp_path: Path, name: str, fill: float) -> None:
    ckpt = write_random_checkpoint(tmp_path / "c", "test-gqa", num_shards=2, dtype=torch.float32)
    _load(ckpt)  # the clean checkpoint loads
    # A replicated tensor (norm.weight) is read from the first shard; split ones from both.
    shard, other = ("00", "01") if name == "norm.weight" else ("01", "00")
    _spoil_meta(ckpt / f"consolidated.{shard}.pth", name, fill)
    with pytest.raises(NonFiniteWeightsError) as info:
        _load(ckpt)
    message = str(info.value)
    assert name in message
    assert str(ckpt / f"consolidated.{shard}.pth") in message
    assert f"consolidated.{other}.pth" not in message
    assert ("1 NaN" in message) if math.isnan(fill) else ("1 infinite" in message)
    assert isinstance(info.value, LlamaError)
    assert isinstance(info.value, ValueError)


def test_bit_flipped_rows_of_inf_are_refused(tmp_path: Path) -> None:
    ckpt = write_random_checkpoint(tmp_path / "c", "test-gqa", dtype=torch.bfloat16)
    _spoil_meta(ckpt / "consolidated.00.pth", "layers.0.attention.wk.weight", math.inf, rows=slice(2, 4))
    with pytest.raises(NonFiniteWeightsError,
                       match=r"layers\.0\.attention\.wk\.weight.*0 NaN and \d+ infinite"):
        _load(ckpt, dtype="bf16")


def test_hf_file_with_nan_is_refused_by_name(tmp_path: Path) -> None:
    ckpt = write_random_checkpoint(tmp_path / "c", "test-gqa", format="hf", dtype=torch.float32)
    files = sorted(ckpt.glob("*.safetensors"))
    sd = load(files[0].read_bytes())
    key = next(k for k in sd if k.endswith("mlp.up_proj.weight"))
    sd[key] = sd[key].clone()
    sd[key][0, 0] = math.nan
    save_file(sd, files[0], metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightsError) as info:
        _load(ckpt)
    assert "feed_forward.w3.weight" in str(info.value)
    assert str(files[0]) in str(info.value)


def test_overflow_when_loaded_in_a_narrower_dtype_is_named(tmp_path: Path) -> None:
    ckpt = write_random_checkpoint(tmp_path / "c", "test-gqa", dtype=torch.float32)
    _spoil_meta(ckpt / "consolidated.00.pth", "layers.1.attention.wo.weight", 1e6)  # > float16's 65504
    _load(ckpt)  # finite in float32
    with pytest.raises(NonFiniteWeightsError, match=r"layers\.1\.attention\.wo\.weight.*overflows float16"):
        _load(ckpt, dtype="fp16")
