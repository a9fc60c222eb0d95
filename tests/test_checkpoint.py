"""Reading, writing and converting checkpoints (one process; tests/test_parallel.py does the
multi-process part). Oracles: the weights we wrote, and transformers' LlamaForCausalLM."""

from __future__ import annotations

import json
import logging
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama3 import ModelArgs, Transformer
from llama3.checkpoint import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    ParamsMismatchError,
    ShardMismatchError,
    UnsafeCheckpointError,
    check_shard_layout,
    convert_checkpoint,
    hf_config_to_model_args,
    inspect_checkpoint,
    load_full_state_dict,
    load_model,
    model_args_to_hf_config,
    permute_for_rotate_half,
    random_state_dict,
    read_model_args,
    save_hf_checkpoint,
    save_meta_checkpoint,
    unpermute_rotate_half,
    write_random_checkpoint,
)
from llama3.presets import PRESETS, preset_args
from llama3.tokenizer import TokenizerNotFoundError, find_tokenizer, require_tokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = PRESETS["test-gqa"]  # GQA 8/2, vocabulary 256, FFN multiplier 1.3, RoPE scaling factor 32


def _load(path, seq=16, **kw) -> Transformer:
    return load_model(path, max_seq_len=seq, max_batch_size=2, device="cpu", dtype=kw.pop("dtype", "fp32"),
                      verbose=kw.pop("verbose", False), **kw)


@pytest.fixture
def tiny(tmp_path):
    args = ModelArgs(**TINY)
    sd = random_state_dict(args, seed=3, std=0.1)
    return args, sd, tmp_path


# --- Meta layout -------------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_checkpoint_loads_exact_weights(tiny, shards):
    args, sd, tmp = tiny
    save_meta_checkpoint(sd, args, tmp, num_shards=shards)
    model = _load(tmp)
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    for name, t in sd.items():
        assert torch.equal(loaded[name], t), name
    assert not any(p.is_meta for p in model.parameters())
    assert model.layers[0].attention.kv_cache.k.dtype == torch.float32
    # Our params.json extension carries the non-default scaling factor.
    assert json.loads((tmp / "params.json").read_text())["rope_scale_factor"] == 32.0
    assert read_model_args(tmp).rope_scale_factor == 32.0


def test_load_casts_to_requested_dtype(tiny):
    args, sd, tmp = tiny
    save_meta_checkpoint(sd, args, tmp)
    model = _load(tmp, dtype=torch.bfloat16)
    w2 = sd["layers.1.feed_forward.w2.weight"]
    assert torch.equal(model.layers[1].feed_forward.w2.weight, w2.bfloat16())
    assert model.layers[0].attention.kv_cache.v.dtype == torch.bfloat16
    assert model(torch.tensor([[1, 2, 3]]), 0).dtype == torch.float32


def test_tied_meta_checkpoint_stores_embedding_once_and_reties(tmp_path):
    args = ModelArgs(**{**TINY, "tie_word_embeddings": True})
    sd = random_state_dict(args, seed=1)
    save_meta_checkpoint(sd, args, tmp_path)
    # No tie flag in params.json: the tie is recognised from the shared storage in the file.
    assert "tie_word_embeddings" not in json.loads((tmp_path / "params.json").read_text())
    assert read_model_args(tmp_path).tie_word_embeddings
    model = _load(tmp_path)
    assert model.output.weight is model.tok_embeddings.weight
    assert torch.equal(model.output.weight, sd["tok_embeddings.weight"])


def test_override_rope_scale_factor(tiny):
    args, sd, tmp = tiny
    save_meta_checkpoint(sd, args, tmp)
    assert _load(tmp, rope_scale_factor=8.0).params.rope_scale_factor == 8.0
    assert read_model_args(tmp, max_seq_len=99).max_seq_len == 99


def test_hf_download_original_folder_is_used(tiny):
    args, sd, tmp = tiny
    save_meta_checkpoint(sd, args, tmp / "original")
    (tmp / "original" / "tokenizer.model").write_bytes(b"x")
    # An HF config.json beside original/ is authoritative for the scaling constants.
    (tmp / "config.json").write_text(json.dumps({
        "hidden_size": 64, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 256,
        "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
    info = inspect_checkpoint(tmp)
    assert info.format == "meta"
    assert info.path == tmp / "original"
    assert read_model_args(tmp).rope_scale_factor == 16.0
    assert find_tokenizer(tmp) == tmp / "original" / "tokenizer.model"
    assert torch.equal(_load(tmp).state_dict()["layers.0.attention.wk.weight"],
                       sd["layers.0.attention.wk.weight"])


def test_hf_special_token_ids_are_metas(meta_tokenizer, tmp_path):
    # config.json and generation_config.json take their ids from the tokenizer's one table (no
    # literal numbers); Meta's reference tokenizer is the oracle.
    from llama3.checkpoint.hf_tokenizer import write_hf_extras

    args = ModelArgs(**PRESETS["test-chat"])
    config = model_args_to_hf_config(args)
    assert (config["bos_token_id"], config["eos_token_id"]) == (meta_tokenizer.bos_id, meta_tokenizer.eos_id)
    write_hf_extras(tmp_path, args, None)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["bos_token_id"] == meta_tokenizer.bos_id
    assert generation["eos_token_id"] == list(meta_tokenizer.stop_tokens)


# --- Hugging Face layout against transformers ---------------------------------------------------

transformers = pytest.importorskip("transformers")

HF_CASES = {
    "gqa": dict(config=dict(num_key_value_heads=2, intermediate_size=176), seq=16),
    # Llama 3.2's scaling (factor 32); 300 positions so the scaled band changes the angles.
    "llama3_rope": dict(config=dict(num_key_value_heads=2, intermediate_size=128, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192), max_position_embeddings=131072), seq=300),
    "tied": dict(config=dict(num_key_value_heads=4, intermediate_size=100, tie_word_embeddings=True), seq=16),
    "sharded_files": dict(config=dict(num_key_value_heads=8, intermediate_size=192), seq=16,
                          max_shard_size="40KB"),
}


def _hf_model(case: dict, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{
        "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
        "rms_norm_eps": 1e-5, "initializer_range": 0.08,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, **case["config"]})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(input_ids=tokens).logits.float()


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_hf_checkpoint_matches_transformers(tmp_path, name):
    case = HF_CASES[name]
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path, **({"max_shard_size": case["max_shard_size"]} if "max_shard_size" in case
                                    else {}))
    if "max_shard_size" in case:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    tokens = torch.randint(0, 256, (2, case["seq"]), generator=torch.Generator().manual_seed(1))
    model = _load(tmp_path, seq=case["seq"])
    assert model.params.ffn_hidden_dim == hf.config.intermediate_size
    want = _hf_logits(hf, tokens)
    assert (model(tokens, 0) - want).abs().max().item() <= 1e-4
    if name == "tied":
        assert model.output.weight is model.tok_embeddings.weight
    if name == "llama3_rope":
        assert model.params.use_scaled_rope
        assert model.params.rope_scale_factor == 32.0
        # The older spelling (transformers 4.x): rope_scaling plus a top-level rope_theta.
        config = json.loads((tmp_path / "config.json").read_text())
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        config["rope_scaling"] = rope
        (tmp_path / "config.json").write_text(json.dumps(config))
        again = _load(tmp_path, seq=case["seq"])
        assert vars(again.params) == vars(model.params)
        # And the scaling matters at this length: unscaled RoPE gives other logits.
        unscaled = _load(tmp_path, seq=case["seq"], rope_scale_factor=1.0)
        assert (unscaled(tokens, 0) - want).abs().max().item() > 1e-3


def test_our_hf_export_matches_transformers(tiny):
    """save_hf_checkpoint's files and config.json, read by transformers, compute our logits."""
    args, sd, tmp = tiny
    save_hf_checkpoint(sd, args, tmp)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ours = Transformer(ModelArgs(**TINY, max_seq_len=300, max_batch_size=2))
    ours.load_state_dict(sd)
    tokens = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(2))
    assert (ours(tokens, 0) - _hf_logits(hf, tokens)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_meta_hf_meta_round_trip_is_exact(tmp_path, tied):
    args = ModelArgs(**{**TINY, "tie_word_embeddings": tied})
    sd = random_state_dict(args, seed=5, dtype=torch.bfloat16)
    save_meta_checkpoint(sd, args, tmp_path / "meta", num_shards=2)
    (tmp_path / "meta" / "tokenizer.model").write_bytes(b"tok")
    convert_checkpoint(tmp_path / "meta", tmp_path / "hf", to="hf")
    convert_checkpoint(tmp_path / "hf", tmp_path / "back", to="meta", num_shards=2)
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == b"tok"
    before = json.loads((tmp_path / "meta" / "params.json").read_text())
    after = json.loads((tmp_path / "back" / "params.json").read_text())
    # config.json keeps only intermediate_size: the multiple_of/multiplier pair may differ, the size not.
    assert ModelArgs(**after).ffn_hidden_dim == ModelArgs(**before).ffn_hidden_dim
    ffn_keys = ("multiple_of", "ffn_dim_multiplier")
    assert {k: v for k, v in after.items() if k not in ffn_keys} == {
        k: v for k, v in before.items() if k not in ffn_keys}
    for shard in ("consolidated.00.pth", "consolidated.01.pth"):
        a = torch.load(tmp_path / "meta" / shard, weights_only=True)
        b = torch.load(tmp_path / "back" / shard, weights_only=True)
        assert set(a) == set(b)
        for name in a:
            assert a[name].dtype == b[name].dtype == torch.bfloat16
            assert torch.equal(a[name], b[name]), name
    full, _ = load_full_state_dict(tmp_path / "hf")
    for name in sd:
        assert torch.equal(full[name], sd[name]), name


def test_rotate_half_permutation():
    w = torch.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of head_dim 8
    p = permute_for_rotate_half(w, 2)
    # Head 0 in HF order: Meta's even rows (pair first halves), then odd rows.
    assert p[:8, 0].tolist() == [0, 6, 12, 18, 3, 9, 15, 21]
    assert torch.equal(unpermute_rotate_half(p, 2), w)


@pytest.mark.parametrize(("dim", "intermediate", "multiple_of", "mult"), [
    (4096, 14336, 1024, 1.3),   # 8B
    (8192, 28672, 4096, 1.3),   # 70B (Meta's params: multiple_of 4096, ffn_dim_multiplier 1.3)
    (2048, 8192, 256, 1.5),     # 3.2 1B
    (16384, 53248, 4096, 1.2),  # 405B
    (64, 100, None, None),      # anything else: reproduced exactly all the same
    (64, 30, None, None),
])
def test_intermediate_size_is_reproduced(dim, intermediate, multiple_of, mult):
    args = hf_config_to_model_args({"hidden_size": dim, "intermediate_size": intermediate,
                                    "num_hidden_layers": 1, "num_attention_heads": 8, "vocab_size": 16})
    assert args.ffn_hidden_dim == intermediate
    if multiple_of is not None:
        assert (args.multiple_of, args.ffn_dim_multiplier) in {(multiple_of, mult), (256, mult), (1024, mult)}


# --- Safety and errors -------------------------------------------------------------------------


class _Evil:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "plain_pickle"])
def test_malicious_pickle_is_refused_not_run(tiny, legacy):
    args, sd, tmp = tiny
    save_meta_checkpoint(sd, args, tmp)
    marker = tmp / "pwned"
    payload = {**{k: v for k, v in sd.items()}, "tok_embeddings.weight": _Evil(marker)}
    shard = tmp / "consolidated.00.pth"
    if legacy:
        shard.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, shard)
    with pytest.raises(UnsafeCheckpointError, match="refused to load .*consolidated.00.pth"):
        _load(tmp)
    assert not marker.exists()


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as e:
        _load(tmp_path / "nope")
    assert isinstance(e.value, FileNotFoundError)
    assert str(tmp_path / "nope") in str(e.value)


def test_directory_without_weights_lists_contents(tmp_path):
    (tmp_path / "params.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(CheckpointFormatError, match=r"no checkpoint weights .*found: notes.txt, params.json"):
        read_model_args(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="no config.json"):
        inspect_checkpoint(tmp_path)


def test_params_disagreeing_with_tensor_shapes(tiny):
    args, sd, tmp = tiny
    save_meta_checkpoint(sd, args, tmp)
    params = json.loads((tmp / "params.json").read_text())
    (tmp / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    with pytest.raises(ParamsMismatchError, match=r"layers.0.attention.wk.weight has shape \[16, 64\] "
                                                  r"but params.json implies \[32, 64\]"):
        _load(tmp)
    (tmp / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    with pytest.raises(ParamsMismatchError, match=r"n_layers=3\): missing layers.2.attention.wk.weight, "):
        _load(tmp)


def test_hf_config_disagreeing_with_tensor_shapes(tiny):
    args, sd, tmp = tiny
    save_hf_checkpoint(sd, args, tmp)
    config = json.loads((tmp / "config.json").read_text())
    (tmp / "config.json").write_text(json.dumps({**config, "vocab_size": 512}))
    expected = (r"tensor (lm_head|model.embed_tokens).weight \(\w+.weight\) "
                r"has shape \[256, 64\] but config.json implies \[512, 64\]")
    with pytest.raises(ParamsMismatchError, match=expected):
        _load(tmp)


def test_shard_count_that_cannot_map_onto_world_size(tmp_path):
    args = ModelArgs(**TINY)
    with pytest.raises(ShardMismatchError, match=r"3 shard\(s\) .* 2 model-parallel ranks.*work: 1, 3\b"):
        check_shard_layout(3, 2)
    with pytest.raises(ShardMismatchError, match=r"4 shard\(s\) .* 3 model-parallel.*work: 1, 2, 4, 8 "):
        check_shard_layout(4, 3, args)
    for m, n in [(1, 2), (2, 1), (4, 2), (2, 4), (8, 8)]:
        check_shard_layout(m, n, args)
    with pytest.raises(ShardMismatchError, match=r"cannot be split evenly into 3 .* work with this 1-shard "
                                                  r"checkpoint: 1, 2, 4, 8$"):
        save_meta_checkpoint(random_state_dict(args), args, tmp_path, num_shards=3)
    assert not any(tmp_path.iterdir())


def test_missing_tokenizer_says_where_to_get_it(tmp_path):
    assert find_tokenizer(tmp_path) is None
    with pytest.raises(TokenizerNotFoundError, match="pip install --no-deps llama-models") as e:
        require_tokenizer(tmp_path)
    # Discovery lives in llama3.tokenizer now (a leaf module), so this is a FileNotFoundError.
    assert isinstance(e.value, FileNotFoundError)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(TokenizerNotFoundError, match="Meta's weights download"):
        require_tokenizer(tmp_path, tmp_path / "tok.model")


def test_unsupported_rope_type():
    with pytest.raises(CheckpointFormatError, match="'yarn' is not supported"):
        hf_config_to_model_args({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                                 "num_attention_heads": 8, "vocab_size": 16,
                                 "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


# --- Scripts -----------------------------------------------------------------------------------


def test_scripts_make_and_convert(tmp_path):
    def run(*argv):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    fake_tokenizer = REPO / "pyproject.toml"
    out = run("scripts/make_tiny_checkpoint.py", str(tmp_path / "m"), "--num_shards", "2", "--dim", "32",
              "--n_heads", "4", "--n_kv_heads", "1", "--seed", "7", "--tokenizer", str(fake_tokenizer))
    assert "wrote meta checkpoint" in out
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == fake_tokenizer.read_bytes()
    args = read_model_args(tmp_path / "m")
    assert (args.dim, args.n_kv_heads, args.vocab_size, args.n_layers) == (32, 1, 128256, 2)
    assert inspect_checkpoint(tmp_path / "m").num_shards == 2
    run("scripts/convert_checkpoint.py", "reshard", str(tmp_path / "m"), str(tmp_path / "r"),
        "--num_shards", "1")
    full, _ = load_full_state_dict(tmp_path / "m")
    resharded = torch.load(tmp_path / "r" / "consolidated.00.pth", weights_only=True)
    assert set(full) == set(resharded)
    assert all(torch.equal(full[k], resharded[k]) for k in full)
    expected = random_state_dict(args, seed=7)
    assert all(torch.equal(full[k], expected[k]) for k in full)


# --- Reliability (issue 10): inconsistent checkpoints raise errors naming file, tensor, numbers ----

from llama3.checkpoint import (  # noqa: E402
    ConfigValueError,
    ConversionOverflowError,
    KVReplicaMismatchError,
    NotARegularFileError,
    ShardFilesError,
    TensorDtypeError,
    TiedWeightsMismatchError,
    UnsafePathError,
)


def _write_meta(path, args, shards=1, seed=0):
    save_meta_checkpoint(random_state_dict(args, seed=seed), args, path, num_shards=shards)
    return path


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("bad", [torch.int64, torch.bool, torch.complex64])
def test_reliability_non_float_tensor_meta(tiny, bad):
    args, sd, tmp = tiny
    sd = dict(sd, **{"layers.1.feed_forward.w3.weight": sd["layers.1.feed_forward.w3.weight"].to(bad)})
    save_meta_checkpoint(sd, args, tmp)
    name = str(bad).removeprefix("torch.")
    expected = rf"00.pth: tensor layers.1.feed_forward.w3.weight has dtype {name} \(shape \[\d+, 64\]\)"
    with pytest.raises(TensorDtypeError, match=expected):
        _load(tmp)


def test_reliability_non_float_tensor_hf(tiny):
    from safetensors.torch import load_file, save_file

    args, sd, tmp = tiny
    save_hf_checkpoint(sd, args, tmp)
    tensors = load_file(tmp / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, tmp / "model.safetensors")
    with pytest.raises(TensorDtypeError, match=r"model.safetensors: tensor model.norm.weight has dtype I32"):
        _load(tmp)


def test_reliability_tied_flag_with_a_different_output_weight(tiny):
    args, sd, tmp = tiny
    # Hugging Face: tie_word_embeddings true next to a stored lm_head.weight that differs.
    save_hf_checkpoint(sd, args, tmp / "hf")
    _edit_json(tmp / "hf" / "config.json", tie_word_embeddings=True)
    expected = (r"model.safetensors: config.json says tie_word_embeddings=true, but the stored "
                r"lm_head.weight differs .*max \|difference\| \d")
    with pytest.raises(TiedWeightsMismatchError, match=expected):
        _load(tmp / "hf")
    # Meta: the same with "tie_word_embeddings": true in params.json.
    _write_meta(tmp / "meta", args)
    _edit_json(tmp / "meta" / "params.json", tie_word_embeddings=True)
    with pytest.raises(TiedWeightsMismatchError, match=r"00.pth: .*stored output.weight differs"):
        _load(tmp / "meta")
    # An equal copy is fine (and is recognised as tied by value).
    sd_tied = dict(sd, **{"output.weight": sd["tok_embeddings.weight"].clone()})
    save_meta_checkpoint(sd_tied, args, tmp / "copy")
    model = _load(tmp / "copy")
    assert model.params.tie_word_embeddings
    assert model.output.weight is model.tok_embeddings.weight


def test_reliability_kv_replica_shards_that_differ(tmp_path):
    args = ModelArgs(**{**TINY, "n_kv_heads": 1})
    _write_meta(tmp_path, args, shards=2)
    assert torch.equal(_load(tmp_path).layers[0].attention.wk.weight,
                       random_state_dict(args)["layers.0.attention.wk.weight"])
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    shard["layers.1.attention.wv.weight"] = shard["layers.1.attention.wv.weight"] + 1.0
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(KVReplicaMismatchError, match=r"consolidated.00.pth and consolidated.01.pth must hold "
                                                     r"identical copies of KV head 0 of "
                                                     r"layers.1.attention.wv.weight \(n_kv_heads=1 on 2 "
                                                     r"shards\), but they differ \(max \|difference\| 1"):
        _load(tmp_path)


def test_reliability_shard_files_not_numbered_0_to_n_minus_1(tiny):
    args, sd, tmp = tiny
    _write_meta(tmp, args, shards=2)
    (tmp / "consolidated.01.pth").rename(tmp / "consolidated.05.pth")
    with pytest.raises(ShardFilesError, match=r"missing consolidated.01.pth; unexpected consolidated.05.pth"):
        _load(tmp)
    (tmp / "consolidated.05.pth").rename(tmp / "consolidated.1.pth")
    with pytest.raises(ShardFilesError, match=r"unexpected consolidated.1.pth"):
        inspect_checkpoint(tmp)


def test_reliability_missing_or_extra_shard_reported_as_such(tiny):
    args, sd, tmp = tiny
    _write_meta(tmp / "missing", args, shards=4)
    (tmp / "missing" / "consolidated.03.pth").unlink()
    (tmp / "missing" / "consolidated.02.pth").unlink()
    expected = r"saved as 4 shards, but .* holds 2 consolidated.\*.pth file\(s\): 2 shard\(s\) are missing"
    with pytest.raises(ShardFilesError, match=expected):
        _load(tmp / "missing")
    _write_meta(tmp / "extra", args)
    (tmp / "extra" / "consolidated.01.pth").write_bytes((tmp / "extra" / "consolidated.00.pth").read_bytes())
    with pytest.raises(ShardFilesError, match=r"saved as 1 shards, .* 1 extra shard file"):
        _load(tmp / "extra")


@pytest.mark.parametrize(("fmt", "key"), [("meta", "use_scaled_rope"), ("meta", "tie_word_embeddings"),
                                     ("hf", "tie_word_embeddings"), ("hf", "attention_bias")])
def test_reliability_string_booleans_refused(tiny, fmt, key):
    args, sd, tmp = tiny
    if fmt == "meta":
        save_meta_checkpoint(sd, args, tmp)
        config = tmp / "params.json"
    else:
        save_hf_checkpoint(sd, args, tmp)
        config = tmp / "config.json"
    _edit_json(config, **{key: "false"})
    expected = (rf"{config.name}: '{key}' must be true or false \(a JSON boolean, not a string\), "
                r"got 'false' \(str\)")
    with pytest.raises(ConfigValueError, match=expected):
        read_model_args(tmp)


@pytest.mark.parametrize(("key", "value"), [("rope_theta", 0), ("rope_theta", -500000.0), ("norm_eps", 0.0),
                                       ("rope_scale_factor", -8.0), ("rope_theta", float("nan")),
                                       ("norm_eps", float("inf")), ("rope_theta", float("-inf"))])
def test_reliability_bad_constants_in_params_json(tiny, key, value):
    args, sd, tmp = tiny
    save_meta_checkpoint(sd, args, tmp)
    _edit_json(tmp / "params.json", **{key: value})
    assert json.loads((tmp / "params.json").read_text())[key] != 1.0  # NaN/Infinity written as JSON allows
    with pytest.raises(ConfigValueError, match=rf"params.json: '{key}' must be a finite number > 0, got "):
        _load(tmp)


@pytest.mark.parametrize(("key", "value"), [("factor", 0.0), ("low_freq_factor", -1.0),
                                       ("original_max_position_embeddings", 0), ("rope_theta", float("nan"))])
def test_reliability_bad_rope_constants_in_config_json(tiny, key, value):
    args, sd, tmp = tiny
    save_hf_checkpoint(sd, args, tmp)
    config = json.loads((tmp / "config.json").read_text())
    config["rope_scaling"][key] = value
    (tmp / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigValueError, match=rf"config.json: '{key}' must be a (finite number > 0|positive "
                                               r"integer), got "):
        read_model_args(tmp)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_reliability_index_pointing_outside_the_directory(tiny, entry):
    args, sd, tmp = tiny
    save_hf_checkpoint(sd, args, tmp / "ckpt", max_shard_bytes=20_000)
    index = tmp / "ckpt" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    outside = tmp / "outside.safetensors"
    outside.write_bytes((tmp / "ckpt" / data["weight_map"][first]).read_bytes())
    data["weight_map"][first] = entry
    index.write_text(json.dumps(data))
    with pytest.raises(UnsafePathError, match=rf"points at '{entry}', outside the checkpoint directory"):
        _load(tmp / "ckpt")


def test_reliability_conversion_refuses_overflow_in_target_dtype(tiny):
    args, sd, tmp = tiny
    sd = dict(sd)
    sd["layers.0.feed_forward.w2.weight"] = sd["layers.0.feed_forward.w2.weight"].clone()
    sd["layers.0.feed_forward.w2.weight"][3, 5] = 1e6  # beyond float16's 65504
    save_meta_checkpoint(sd, args, tmp / "src")
    expected = (r"tensor layers.0.feed_forward.w2.weight holds values up to 1e\+06 \(1 element\(s\) beyond "
                r"float16's largest finite value 65504\)")
    with pytest.raises(ConversionOverflowError, match=expected):
        convert_checkpoint(tmp / "src", tmp / "dst", to="hf", dtype=torch.float16)
    assert not (tmp / "dst").exists()
    assert sorted(p.name for p in tmp.iterdir()) == ["src"]
    convert_checkpoint(tmp / "src", tmp / "dst", to="hf", dtype=torch.bfloat16)  # wide enough


@pytest.mark.parametrize("name", ["consolidated.00.pth", "params.json", "model.safetensors", "config.json"])
def test_reliability_named_pipe_refused_without_blocking(tiny, name):
    import os
    import threading

    args, sd, tmp = tiny
    save = save_hf_checkpoint if name in ("model.safetensors", "config.json") else save_meta_checkpoint
    save(sd, args, tmp)
    (tmp / name).unlink()
    os.mkfifo(tmp / name)
    result = {}

    def target():
        try:
            _load(tmp)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():  # unblock the reader so the test process can exit
        with open(tmp / name, "wb"):
            pass
        pytest.fail(f"loading blocked on the named pipe {name}")
    assert isinstance(result.get("error"), NotARegularFileError), result
    assert f"{tmp / name} is a named pipe, not a regular file" in str(result["error"])


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(to="meta", num_shards=0), "num_shards must be a positive integer, got 0"),
    (dict(to="meta", num_shards=-1), "num_shards must be a positive integer, got -1"),
    (dict(to="meta", num_shards=1.5), "num_shards must be a positive integer, got 1.5"),
    (dict(to="meta", num_shards="2"), "num_shards must be a positive integer, got '2'"),
    (dict(to="meta", num_shards=True), "num_shards must be a positive integer, got True"),
    (dict(to="hf", num_shards=2), "num_shards=2 applies to the Meta format only"),
    (dict(to="safetensors"), "to must be 'meta' or 'hf'"),
    (dict(to="hf", dtype=torch.int8), "dtype must be a floating-point torch.dtype"),
    (dict(to="hf", max_shard_bytes=0), "max_shard_bytes must be a positive integer"),
    (dict(to="hf", rope_scale_factor=float("nan")), "rope_scale_factor must be a finite number > 0"),
])
def test_reliability_convert_validates_arguments_before_touching_disk(tiny, kwargs, message):
    args, sd, tmp = tiny
    save_meta_checkpoint(sd, args, tmp / "src")
    with pytest.raises(ValueError, match=re.escape(message)):
        convert_checkpoint(tmp / "src", tmp / "dst", **kwargs)
    assert not (tmp / "dst").exists()
    assert sorted(p.name for p in tmp.iterdir()) == ["src"]


def test_reliability_malformed_config_values_name_file_key_and_type(tiny):
    args, sd, tmp = tiny
    save_meta_checkpoint(sd, args, tmp / "meta")
    _edit_json(tmp / "meta" / "params.json", dim="64")
    with pytest.raises(ConfigValueError, match=r"params.json: 'dim' must be a positive integer, got '64' \("):
        read_model_args(tmp / "meta")
    save_hf_checkpoint(sd, args, tmp / "hf")
    _edit_json(tmp / "hf" / "config.json", num_attention_heads=[8])
    expected = r"config.json: 'num_attention_heads' must be a positive integer, got \[8\] \(list\)"
    with pytest.raises(ConfigValueError, match=expected):
        _load(tmp / "hf")
    config = json.loads((tmp / "hf" / "config.json").read_text())
    del config["num_attention_heads"]
    (tmp / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match=r"config.json lacks 'num_attention_heads'"):
        _load(tmp / "hf")
    (tmp / "hf" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointFormatError, match=r"config.json must hold a JSON object, found list"):
        _load(tmp / "hf")


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(seq=0), "argument max_seq_len must be a positive integer, got 0"),
    (dict(rope_scale_factor=-1), "argument rope_scale_factor must be a finite number > 0, got -1"),
    (dict(rope_scale_factor=float("inf")), "argument rope_scale_factor must be a finite number > 0, got inf"),
])
def test_reliability_bad_arguments_are_reported_as_arguments(tiny, kwargs, message):
    args, sd, tmp = tiny
    save_meta_checkpoint(sd, args, tmp)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        _load(tmp, **kwargs)
    assert "params.json" not in str(e.value)
    assert not isinstance(e.value, CheckpointError)


def test_reliability_missing_directory_is_not_a_missing_tokenizer(tmp_path, monkeypatch):
    from llama3 import Llama
    from llama3.checkpoint import HubError

    for call in (lambda: _load(tmp_path / "typo"), lambda: inspect_checkpoint(tmp_path / "typo"),
                 lambda: Llama.build(str(tmp_path / "typo"), max_seq_len=8, max_batch_size=1)):
        with pytest.raises(CheckpointNotFoundError, match="does not exist") as e:
            call()
        assert not isinstance(e.value, TokenizerNotFoundError)
        assert "typo" in str(e.value)
    # A relative "dir/typo" beside a real dir/ is a mistyped path, not a Hub id to download.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpts").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="checkpoint directory ckpts/typo does not exist") as e:
        Llama.build("ckpts/typo", max_seq_len=8, max_batch_size=1)
    assert not isinstance(e.value, HubError)


def test_reliability_output_directory_kept_unless_overwrite(tmp_path):
    args = preset_args("test-gqa")
    out = write_random_checkpoint(tmp_path / "ckpt", args, num_shards=2, dtype=torch.float32)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for call in (lambda: write_random_checkpoint(out, args, format="hf"),
                 lambda: convert_checkpoint(out, out, to="hf"),
                 lambda: convert_checkpoint(out, out, to="hf", overwrite=True)):
        with pytest.raises((CheckpointError, ValueError), match="not empty|is the source"):
            call()
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # With overwrite the old contents go entirely: no stale shard or mixed Meta + HF directory.
    write_random_checkpoint(out, args, format="hf", overwrite=True, dtype=torch.float32)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                     "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind


def test_reliability_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import llama3.checkpoint.meta as meta_module

    def fail(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(meta_module.torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        write_random_checkpoint(tmp_path / "ckpt", "test-gqa")
    assert list(tmp_path.iterdir()) == []


def test_reliability_random_checkpoint_validates_arguments(tmp_path):
    for kwargs, message in [(dict(num_shards=0), "num_shards must be a positive integer"),
                            (dict(format="gguf"), "format must be 'meta' or 'hf'"),
                            (dict(format="hf", num_shards=2), "num_shards applies to the Meta format only"),
                            (dict(std=float("nan")), "std must be a finite number > 0")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            write_random_checkpoint(tmp_path / "x", "test-gqa", **kwargs)
    with pytest.raises(ValueError, match="unknown preset 'tiny-x'; choose one of llama-3-8b"):
        write_random_checkpoint(tmp_path / "x", "tiny-x")
    assert list(tmp_path.iterdir()) == []


# --- First hour (issue 13): the 3.2 RoPE rule, progress and messages, Hub ids, HF output ----------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines():
    handler = _Records()
    logger = logging.getLogger("llama3")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


@pytest.mark.parametrize("storage", ["absent", "shared", "equal_copy"])
def test_llama32_rope_factor_32_for_tied_meta_checkpoints(tmp_path, log_lines, storage):
    args = ModelArgs(**{**TINY, "rope_scale_factor": 8.0, "tie_word_embeddings": True})  # factor not saved
    sd = random_state_dict(args, seed=2)
    if storage == "absent":
        sd = {k: v for k, v in sd.items() if k != "output.weight"}
    elif storage == "equal_copy":
        sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    save_meta_checkpoint(sd, args, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    assert params["use_scaled_rope"]
    assert "rope_scale_factor" not in params
    assert "tie_word_embeddings" not in params
    if storage == "absent":
        shard = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
        del shard["output.weight"]
        torch.save(shard, tmp_path / "consolidated.00.pth")
    model = _load(tmp_path, verbose=True)
    assert model.params.rope_scale_factor == 32.0
    assert model.params.tie_word_embeddings
    assert any("RoPE scaling: factor 32 (Llama 3.2 recognised by tied input/output embeddings" in line
               for line in log_lines), log_lines
    assert _load(tmp_path, rope_scale_factor=8.0).params.rope_scale_factor == 8.0  # the override stays


def test_llama32_rope_factor_by_shape_and_default_8_otherwise(tmp_path):
    untied = ModelArgs(**{**TINY, "rope_scale_factor": 8.0})
    _write_meta(tmp_path / "31", untied)
    assert read_model_args(tmp_path / "31").rope_scale_factor == 8.0
    # The 3.2 1B shape (only params.json is read; a stand-in shard, tie flag given).
    (tmp_path / "1b").mkdir()
    p = PRESETS["llama-3.2-1b"]
    (tmp_path / "1b" / "params.json").write_text(json.dumps({
        **{k: p[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                             "ffn_dim_multiplier", "norm_eps", "rope_theta")},
        "use_scaled_rope": True, "tie_word_embeddings": False}))
    torch.save({"tok_embeddings.weight": torch.zeros(1)}, tmp_path / "1b" / "consolidated.00.pth")
    assert read_model_args(tmp_path / "1b").rope_scale_factor == 32.0
    # An HF download's config.json stays authoritative over the rule.
    tied = ModelArgs(**{**TINY, "tie_word_embeddings": True})
    _write_meta(tmp_path / "hf" / "original", tied)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(model_args_to_hf_config(
        ModelArgs(**{**TINY, "tie_word_embeddings": True, "rope_scale_factor": 16.0}))))
    assert read_model_args(tmp_path / "hf").rope_scale_factor == 16.0


def test_loader_logs_files_and_progress_and_is_quiet_when_not_verbose(tiny, log_lines, capfd, monkeypatch):
    import functools

    import llama3.checkpoint as checkpoint_module
    from llama3.progress import Progress

    args, sd, tmp = tiny
    save_hf_checkpoint(sd, args, tmp, max_shard_bytes=60_000)
    n_files = len(list(tmp.glob("*.safetensors")))
    assert n_files >= 3
    # Report at every step instead of every 5 s, so this small load shows its rate lines.
    monkeypatch.setattr(checkpoint_module, "Progress", functools.partial(Progress, interval=0.0))
    _load(tmp, verbose=True)
    rates = [line for line in log_lines if line.startswith("loading weights: ")]
    assert rates
    assert all(re.search(r"GB of 0.00 GB \(\d+%\), [\d.]+ GB/s, ETA \d+s$", r) for r in rates)
    assert rates[-1].startswith("loading weights: 0.00 GB of 0.00 GB (100%)")  # the total was right
    assert any(f"Loading Hugging Face checkpoint {tmp} ({n_files} files) on 1 model-parallel rank" in line
               for line in log_lines), log_lines
    assert any(line.startswith("Loaded: done in") for line in log_lines), log_lines
    assert not any("shard(s)" in line for line in log_lines)
    capfd.readouterr()
    _load(tmp, verbose=False)
    assert capfd.readouterr().err == ""


def test_converted_files_get_ordinary_permissions(tiny):
    import os
    import stat

    args, sd, tmp = tiny
    save_meta_checkpoint(sd, args, tmp / "src")
    old = os.umask(0o022)
    try:
        convert_checkpoint(tmp / "src", tmp / "hf", to="hf", max_shard_bytes=60_000)
        write_random_checkpoint(tmp / "rand", "test-gqa", format="hf")
    finally:
        os.umask(old)
    for folder in (tmp / "hf", tmp / "rand"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def _hub_cache(cache: Path, repo: str, build) -> Path:
    """The Hub's documented cache layout: models--org--name/{refs/main, snapshots/<hash>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    build(snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_resolves_from_the_cache_offline(tmp_path, llama3_tokenizer_path, monkeypatch):
    args = preset_args("test-chat")
    sd = random_state_dict(args, seed=4)

    def build(snapshot: Path) -> None:
        save_hf_checkpoint(sd, args, snapshot)
        (snapshot / "original").mkdir()
        (snapshot / "original" / "tokenizer.model").symlink_to(llama3_tokenizer_path)

    snapshot = _hub_cache(tmp_path / "cache", "test-org/Tiny-Llama", build)
    script = (
        "import sys\n"
        "from llama3 import Llama\n"
        "from llama3.checkpoint import HubError, inspect_checkpoint\n"
        "print(inspect_checkpoint('test-org/Tiny-Llama').path)\n"
        "gen = Llama.build('test-org/Tiny-Llama', max_seq_len=16, max_batch_size=1, device='cpu',\n"
        "                  verbose=False)\n"
        "print(type(gen.model).__name__, gen.model.params.dim)\n"
        "try:\n"
        "    inspect_checkpoint('test-org/Not-Cached')\n"
        "except HubError as e:\n"
        "    print('ERROR', e)\n"
    )
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == str(snapshot)
    assert lines[1] == f"Transformer {args.dim}"
    assert lines[2].startswith("ERROR no directory 'test-org/Not-Cached' here; as a Hugging Face Hub id: "
                               "cannot download test-org/Not-Cached from the Hugging Face Hub "
                               "(no network, or HF_HUB_OFFLINE=1)")
    assert "pass a local checkpoint directory" in lines[2]
    # An existing directory always wins over a Hub id of the same spelling.
    monkeypatch.chdir(tmp_path)
    _write_meta(tmp_path / "test-org" / "Tiny-Llama", ModelArgs(**TINY))
    assert inspect_checkpoint("test-org/Tiny-Llama").path == Path("test-org/Tiny-Llama")


def test_converted_hf_folder_loads_in_transformers_with_the_chat_template(tmp_path, llama3_tokenizer,
                                                                          llama3_tokenizer_path):
    from llama3.tokenizer import ChatFormat

    args = preset_args("test-chat")
    sd = random_state_dict(args, seed=6, std=0.1)
    save_meta_checkpoint(sd, args, tmp_path / "meta")
    (tmp_path / "meta" / "tokenizer.model").symlink_to(llama3_tokenizer_path)
    convert_checkpoint(tmp_path / "meta", tmp_path / "hf", to="hf")
    out = tmp_path / "hf"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    stop_ids = [128001, 128008, 128009]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == stop_ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    dialog = [{"role": "system", "content": "Be brief. "},
              {"role": "user", "content": "  What is 2+2?\n"},  # (special-token text would differ:
              # HF renders the template to text, so "<|eot_id|>" in content becomes the control token)
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "Sure?"}]
    want = ChatFormat(llama3_tokenizer).encode_dialog_prompt(dialog)
    got = hf_tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got
    assert list(got) == want
    assert hf_tok("This is a test sentence.")["input_ids"] == [128000, 2028, 374, 264, 1296, 11914, 13]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = Transformer(ModelArgs(**PRESETS["test-chat"], max_seq_len=len(want), max_batch_size=1))
    ours.load_state_dict(sd)
    tokens = torch.tensor([want])
    assert (ours(tokens, 0) - _hf_logits(hf, tokens)).abs().max().item() <= 1e-4
    assert hf.generation_config.eos_token_id == [128001, 128008, 128009]


@pytest.mark.parametrize(("error", "message"), [
    ("GatedRepoError", "test-org/Gated is a gated model: accept its license at https://huggingface.co/test-org/"
                       "Gated while logged in, then log in here with `huggingface-cli login`"),
    ("RepositoryNotFoundError", "there is no Hub repository test-org/Gated (or it is private: log in with "
                                "`huggingface-cli login`); check the spelling"),
])
def test_hub_errors_say_what_to_do(monkeypatch, tmp_path, error, message):
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    from llama3.checkpoint import HubError

    def refuse(*args, **kwargs):
        cls = getattr(hub_errors, error)
        e = cls.__new__(cls)  # built without an HTTP response object
        Exception.__init__(e, "refused")
        raise e

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubError, match=re.escape(message)) as e:
        load_model("test-org/Gated", max_seq_len=8, max_batch_size=1)
    assert "or pass a local checkpoint directory instead" in str(e.value)
    assert isinstance(e.value, CheckpointNotFoundError)


def test_save_pretrained_folder_with_tied_embeddings_and_sharded_safetensors_loads(tmp_path):
    """transformers -> us: a save_pretrained folder with both tied embeddings and an index."""
    hf = _hf_model(dict(config=dict(num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)),
                   seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) >= 3
    assert (tmp_path / "model.safetensors.index.json").is_file()
    info = inspect_checkpoint(str(tmp_path))
    assert info.format == "hf"
    assert info.num_shards == 1
    assert [p.name for p in info.files] == files
    model = _load(tmp_path)
    assert model.params.tie_word_embeddings
    assert model.output.weight is model.tok_embeddings.weight
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    assert (model(tokens, 0) - _hf_logits(hf, tokens)).abs().max().item() <= 1e-4
