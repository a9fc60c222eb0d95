"""Reading, writing and converting checkpoints (one process; tests/test_parallel.py does the
multi-process part). Oracles: the weights we wrote, and transformers' LlamaForCausalLM."""

from __future__ import annotations

import json
import pickle
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
    TokenizerNotFoundError,
    UnsafeCheckpointError,
    check_shard_layout,
    convert_checkpoint,
    find_tokenizer,
    hf_config_to_model_args,
    inspect_checkpoint,
    load_full_state_dict,
    load_model,
    permute_for_rotate_half,
    random_state_dict,
    read_model_args,
    require_tokenizer,
    save_hf_checkpoint,
    save_meta_checkpoint,
    unpermute_rotate_half,
)

REPO = Path(__file__).resolve().parent.parent
TINY = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=32,
            ffn_dim_multiplier=1.3, use_scaled_rope=True, rope_scale_factor=32.0)


def _load(path, seq=16, **kw) -> Transformer:
    return load_model(path, max_seq_len=seq, max_batch_size=2, device="cpu", dtype=kw.pop("dtype", "fp32"),
                      verbose=False, **kw)


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
    assert info.format == "meta" and info.path == tmp / "original"
    assert read_model_args(tmp).rope_scale_factor == 16.0
    assert find_tokenizer(tmp) == tmp / "original" / "tokenizer.model"
    assert torch.equal(_load(tmp).state_dict()["layers.0.attention.wk.weight"],
                       sd["layers.0.attention.wk.weight"])


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
        assert model.params.use_scaled_rope and model.params.rope_scale_factor == 32.0
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


@pytest.mark.parametrize("dim,intermediate,multiple_of,mult", [
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
    assert isinstance(e.value, FileNotFoundError) and str(tmp_path / "nope") in str(e.value)


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
    assert isinstance(e.value, CheckpointError) and str(tmp_path) in str(e.value)
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
