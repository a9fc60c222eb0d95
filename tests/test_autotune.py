"""The kernel autotuner: picks by (stubbed) measurement per phase, honours overrides, caches per
machine and measures again when the CPU or torch changes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import FakeClock

from llama3.errors import LlamaError
from llama3.kernels.autotune import (
    KernelCache,
    KernelOverrideError,
    choose,
    default_cache_path,
    parse_override,
)

MACHINE = {"cpu": "Test CPU 9000", "flags": "avx2 fma", "torch": "2.13.0", "capability": "AVX2"}


def candidates(clock: FakeClock, costs: dict[str, tuple[float, float]], built: list[str]) -> dict:
    """name -> factory; product cost (decode seconds, prefill seconds) by the input's rows."""
    def factory(name: str):
        def build():
            built.append(name)

            def product(x: torch.Tensor) -> torch.Tensor:
                clock.now += costs[name][0 if x.shape[0] == 1 else 1]
                return x
            return product
        return build
    return {name: factory(name) for name in costs}


@pytest.fixture
def cache(tmp_path: Path) -> KernelCache:
    return KernelCache(tmp_path / "kernels.json")


COSTS = {"torch": (3e-3, 1e-2), "fbgemm-fp16": (1e-3, 4e-2), "gemv": (2e-3, 9e-2)}


def run(cache: KernelCache, clock: FakeClock, built: list[str], costs=COSTS, machine=MACHINE, **kw):
    return choose(candidates(clock, costs, built), 2048, 512, torch.bfloat16, family="feed_forward",
                  threads=2, prefill_rows=8, cache=cache, timer=clock, fingerprint=machine,
                  override=kw.pop("override", ""), **kw)


def test_picks_the_fastest_per_phase(cache: KernelCache, caplog: pytest.LogCaptureFixture) -> None:
    clock, built = FakeClock(), []
    with caplog.at_level(logging.INFO, logger="llama3.kernels.autotune"):
        choice = run(cache, clock, built)
    assert (choice.decode, choice.prefill, choice.source) == ("fbgemm-fp16", "torch", "measured")
    assert choice.seconds["gemv"] == pytest.approx({"decode": 2e-3, "prefill": 9e-2})
    assert sorted(built) == sorted(COSTS)
    line = caplog.records[-1].getMessage()
    assert "decode: fbgemm-fp16" in line
    assert "prefill: torch" in line
    assert "gemv 90 ms" in line
    assert "feed_forward [2048x512 bfloat16, 2 threads]" in line


def test_budget_bounds_the_rounds(cache: KernelCache) -> None:
    clock, built = FakeClock(), []
    run(cache, clock, built, budget_s=0.0)
    per_round = sum(d + p for d, p in COSTS.values())
    # one warm-up and the minimum of three timed rounds
    assert clock.now == pytest.approx(4 * per_round)


def test_a_kernel_fast_only_from_the_cache_loses_when_each_round_empties_it(cache: KernelCache) -> None:
    # "cached" is fast when its weight is still in the CPU's cache (called again with no eviction
    # between), slow from memory; "steady" costs the same either way. A model's decoding step reads
    # every weight from memory, so the measurement must rank them as they run from memory.
    clock, evictions, warm = FakeClock(), [], set()
    cost = {"cached": (1e-3, 8e-3), "steady": (3e-3, 3e-3)}

    def factory(name: str):
        def build():
            def product(x: torch.Tensor) -> torch.Tensor:
                clock.now += cost[name][0] if name in warm else cost[name][1]
                warm.add(name)
                return x
            return product
        return build

    def evict() -> None:
        evictions.append(clock.now)
        warm.clear()

    common = dict(family="output", threads=2, cache=cache, timer=clock, fingerprint=MACHINE, override="",
                  phases=("decode",), budget_s=0.0)
    assert choose({n: factory(n) for n in cost}, 128, 64, torch.bfloat16, **common).decode == "cached"
    choice = choose({n: factory(n) for n in cost}, 256, 64, torch.bfloat16, evict=evict, **common)
    assert choice.decode == "steady"
    assert choice.seconds["cached"]["decode"] == pytest.approx(8e-3)
    assert len(evictions) == 3  # once before each timed round (the minimum of three)


def test_cache_hit_builds_nothing(cache: KernelCache) -> None:
    clock, built = FakeClock(), []
    first = run(cache, clock, built)
    built.clear()
    again = run(cache, FakeClock(), built)
    assert built == []
    assert again.source == "cache"
    assert (again.decode, again.prefill, again.seconds) == (first.decode, first.prefill, first.seconds)


@pytest.mark.parametrize("change", [{"cpu": "Other CPU"}, {"flags": "avx2 fma avx512f"},
                                    {"torch": "2.14.0"}, {"capability": "AVX512"}])
def test_cache_invalidated_when_cpu_or_torch_changes(cache: KernelCache, change: dict) -> None:
    run(cache, FakeClock(), [])
    built: list[str] = []
    swapped = {"torch": (1e-3, 5e-2), "fbgemm-fp16": (3e-3, 1e-2), "gemv": (2e-3, 9e-2)}
    choice = run(cache, FakeClock(), built, costs=swapped, machine={**MACHINE, **change})
    assert choice.source == "measured"
    assert sorted(built) == sorted(COSTS)
    assert (choice.decode, choice.prefill) == ("torch", "fbgemm-fp16")
    # the old machine's entry is still there for the old machine
    assert run(cache, FakeClock(), [], machine=MACHINE).source == "cache"


def test_cache_key_includes_shape_threads_and_candidates(cache: KernelCache) -> None:
    run(cache, FakeClock(), [])
    built: list[str] = []
    costs = dict(COSTS, w8a8=(5e-4, 1.0))
    assert run(cache, FakeClock(), built, costs=costs).decode == "w8a8"
    assert "w8a8" in built
    built.clear()
    clock = FakeClock()
    choose(candidates(clock, COSTS, built), 2048, 512, torch.bfloat16, threads=1, prefill_rows=8,
           cache=cache, timer=clock, fingerprint=MACHINE, override="")
    assert sorted(built) == sorted(COSTS)


def test_corrupt_cache_is_ignored_and_rewritten(cache: KernelCache, caplog: pytest.LogCaptureFixture) -> None:
    cache.path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="llama3.kernels.autotune"):
        choice = run(cache, FakeClock(), [])
    assert choice.source == "measured"
    assert any("ignoring the kernel cache" in r.getMessage() for r in caplog.records)
    data = json.loads(cache.path.read_text())
    assert data["version"] == 1
    assert len(data["entries"]) == 1
    assert [p.name for p in cache.path.parent.iterdir()] == ["kernels.json"]  # no temporary left over
    cache.path.write_text(json.dumps({"version": 99, "entries": {}}))
    assert cache.load() == {}


def test_override_argument_and_environment(cache: KernelCache, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    forced = run(cache, FakeClock(), built, override="gemv")
    assert (forced.decode, forced.prefill, forced.source, built) == ("gemv", "gemv", "forced", [])
    monkeypatch.setenv("LLAMA3_KERNELS", "prefill=gemv")
    clock = FakeClock()
    choice = choose(candidates(clock, COSTS, built), 2048, 512, torch.bfloat16, threads=2,
                    prefill_rows=8, cache=cache, timer=clock, fingerprint=MACHINE)
    assert (choice.decode, choice.prefill) == ("fbgemm-fp16", "gemv")
    assert choice.source == "forced+measured"
    # a family-scoped entry applies to that family only, and beats an unscoped one
    assert run(cache, FakeClock(), [], override="torch,feed_forward:decode=gemv").decode == "gemv"
    assert run(cache, FakeClock(), [], override="output:decode=gemv").decode == "fbgemm-fp16"


def test_override_errors(cache: KernelCache) -> None:
    with pytest.raises(KernelOverrideError, match="candidates: torch, fbgemm-fp16, gemv") as info:
        run(cache, FakeClock(), [], override="decode=int4")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, LlamaError)
    with pytest.raises(KernelOverrideError, match="PHASE one of decode, prefill"):
        parse_override("warmup=torch")
    assert parse_override("attention:prefill=torch,torch", "attention") == {"decode": "torch",
                                                                           "prefill": "torch"}


def test_default_cache_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "llama3" / "kernels.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_path() == tmp_path / "home" / ".cache" / "llama3" / "kernels.json"


def test_real_timer_on_real_kernels(cache: KernelCache) -> None:
    """End to end with torch kernels and the real clock: a choice among the candidates, cached."""
    w = torch.randn(64, 32)
    cands = {"torch": lambda: (lambda x: torch.nn.functional.linear(x, w)),
             "matmul": lambda: (lambda x: x @ w.T)}
    choice = choose(cands, 64, 32, torch.float32, prefill_rows=4, budget_s=0.01, cache=cache, override="")
    assert choice.decode in cands
    assert choice.prefill in cands
    assert choice.source == "measured"
    assert cache.get(next(iter(cache.load()))) is not None
