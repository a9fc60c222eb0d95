"""Run the GPU device check in stages under one deadline; see scripts/gpu_check.sh for how to call it.

Each stage is one subprocess with its own timeout. The preflight runs first (~30 s: device,
toolchain, a tiny compile and CUDA graph, attention kernels per call site); the other stages follow
in order of value. Before each, the time left until the overall deadline is compared with what the
stage needs: a stage that no longer fits is skipped (and reported), one that fits runs with its
timeout cut to the time left. A stage that compiles is skipped with the preflight's reason when the
preflight found no C compiler, no Python headers or a broken ``torch.compile``; the fp8 and int4
stages report "not built" while llama3/kernels/fp8.py or int4.py do not exist, do not import, or
are not yet offered by the kernel chooser (``quantize="fp8"`` / ``"int4"``). Output of every stage
goes to ``OUT/gpu_check.log``; ``OUT/summary.json`` is rewritten as each stage ends (so a run cut
short still leaves every finished stage's result) and says per stage: passed / failed / timeout /
skipped / not built, its seconds, and the headline figures. At most 8 files land in OUT.

Sizes: ``full`` is the real check (CUDA, Llama 3 8B shape); ``tiny`` is the dry run (every stage
with a tiny shape: a few minutes on a CPU); ``ci`` is the dry run at the smallest sizes with
``TORCH_COMPILE_DISABLE=1`` (compiled paths run their code eagerly), which tests/test_gpu_check.py
runs so this script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MAX_FILES = 8


@dataclass
class Stage:
    """One step of the check: ``commands`` run one after another (all must succeed)."""

    name: str
    what: str
    need_s: float  # skip unless this much time is left
    limit_s: float  # the stage's own timeout (cut to the time left)
    commands: list[list[str]]
    env: dict[str, str] = field(default_factory=dict)
    figures: Any = None  # callable(out_dir) -> dict of headline numbers, read after the stage
    # callable(out_dir) -> (status, why) when the stage must not run (e.g. "not built"), else None
    gate: Any = None


@dataclass
class Result:
    name: str
    status: str  # passed | failed | timeout | skipped | not built
    seconds: float = 0.0
    detail: str = ""
    cpu_seconds: float = 0.0  # CPU time of the stage's processes (user + system)
    figures: dict[str, Any] = field(default_factory=dict)


# --- sizes ----------------------------------------------------------------------------------------

SIZES: dict[str, dict[str, Any]] = {
    # The lent GPU: Llama 3 8B shape (random weights), bf16. Only the CUDA cases of the tests.
    "full": dict(shape="llama-3-8b", n_layers=None, dtype="bf16", prefill="2048,32768",
                 prefill_eager="512,2048",
                 decode_tokens=128, decode_context=512, batch_eager="1,8", repeats=2,
                 kernel_lens="512,2048,8192,32768", kernel_batch=1, tiny_ckpt_layers=2, gen_len=24,
                 long_prefill="131072",
                 tests=["tests/test_cuda.py", "tests/test_fast_paths.py", "tests/test_quantized_cuda.py",
                        "-k", "cuda"], bandwidth_gib=None),
    # Dry run: every stage, tiny shape, real compilation.
    "tiny": dict(shape="tiny", n_layers=2, dtype="bf16", prefill="64", prefill_eager="32,64",
                 decode_tokens=8, decode_context=16, batch_eager="1,2", repeats=1,
                 kernel_lens="64,256", kernel_batch=1, tiny_ckpt_layers=1, gen_len=6, long_prefill="256",
                 tests=["tests/test_cuda.py"], bandwidth_gib=None),
    # CI: smallest sizes, compilation disabled (the code paths run eagerly).
    "ci": dict(shape="tiny", n_layers=1, dtype="bf16", prefill="16", prefill_eager="16",
               decode_tokens=2, decode_context=8, batch_eager="1,2", repeats=1,
               kernel_lens="32,64", kernel_batch=1, tiny_ckpt_layers=1, gen_len=3, long_prefill="64",
               # Small bandwidth probes (1 GiB ones cost ~20 s here).
               tests=["tests/test_cuda.py"], bandwidth_gib=0.0625),
}


def _bench_figures(path: Path, batches: tuple[int, ...] = (1,)) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    figures: dict[str, Any] = {"bandwidth_gb_s": round(data["bandwidth_gb_s"]["read"], 1)}
    for row in data["rows"]:
        tag = row["impl"] if row["impl"] != "llama3" else row["mode"]
        for key, value in row.items():
            if key.startswith("prefill_") and key.endswith("_tok_s"):
                figures[f"{tag} {key}"] = round(value, 1)
            for b in batches:
                if key in (f"decode_b{b}_tok_s", f"decode_b{b}_pct_roofline"):
                    figures[f"{tag} {key}"] = round(value, 1)
    return figures


def _kernel_figures(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {f"{r['case']} L={r['length']} ms": round(r["ms"], 3) for r in rows}


def _preflight_figures(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    figures: dict[str, Any] = {"compile_ok": data.get("compile_ok"), "problems": data.get("problems")}
    device = data.get("device", {})
    figures.update({k: device.get(k) for k in ("name", "memory_gib", "torch", "cuda", "cudnn", "triton")})
    for site, row in (data.get("attention") or {}).items():
        if isinstance(row, dict):
            figures[f"sdpa {site}"] = f"default {row.get('default')}, pinned {row.get('pinned')}"
    for label, row in (data.get("growing_keys") or {}).items():
        if isinstance(row, dict):
            figures[f"growing keys {label} mean/max ms"] = f"{row.get('mean_ms')} / {row.get('max_ms')}"
    return figures


def _compile_gate(out: Path) -> tuple[str, str] | None:
    """Skip a compiling stage when the preflight ran and found that compiling cannot work."""
    path = out / "preflight.json"
    if not path.is_file():
        return None  # preflight not selected (or it died): try
    data = json.loads(path.read_text())
    if data.get("compile_ok", True):
        return None
    return "skipped", "preflight: " + "; ".join(data.get("problems") or ["compile check failed"])


def _module_gate(module: str, mode: str | None = None) -> Any:
    """A gate: "not built" while ``llama3/<module>.py`` does not exist, does not import, or (with
    ``mode``) ``Llama.build``'s chooser does not offer ``quantize=mode``; else the compile gate.
    The import runs in a subprocess (this script imports no torch), with the stage's environment."""
    def gate(out: Path) -> tuple[str, str] | None:
        if not (REPO / "llama3" / f"{module}.py").is_file():
            return "not built", f"llama3/{module}.py is not in this checkout"
        dotted = "llama3." + module.replace("/", ".")
        probe = f"import {dotted}"
        if mode is not None:
            why = f"quantize={mode!r} is not among QUANTIZE_MODES (not wired into the kernel chooser)"
            probe += (f"\nfrom llama3.kernels import QUANTIZE_MODES\nif {mode!r} not in QUANTIZE_MODES: "
                      f"raise SystemExit({why!r})")
        try:
            proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                                  timeout=120)
        except subprocess.TimeoutExpired:
            return "not built", f"importing {dotted} took over 120 s"
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            return "not built", f"{dotted}: {lines[-1] if lines else f'exit {proc.returncode}'}"[:300]
        return _compile_gate(out)
    return gate


def stages(device: str, size: str, out: Path, work: Path) -> list[Stage]:
    """The check's stages: the preflight, then the rest in order of value."""
    s = SIZES[size]
    py = sys.executable
    common = ["--device", device, "--dtype", s["dtype"], "--decode_tokens", str(s["decode_tokens"]),
              "--decode_context", str(s["decode_context"]), "--repeats", str(s["repeats"]),
              "--shape", s["shape"]] + (["--n_layers", str(s["n_layers"])] if s["n_layers"] else [])
    if s["bandwidth_gib"]:
        common += ["--bandwidth_gib", str(s["bandwidth_gib"])]
    bench = [py, "scripts/benchmark.py", *common]
    full = size == "full"
    ckpt = work / "tiny_ckpt"
    e2e = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "scripts/example_text_completion.py", str(ckpt), "--device", device, "--dtype", "float32",
           "--temperature", "0", "--max_gen_len", str(s["gen_len"]), "--max_batch_size", "2",
           "--max_seq_len", "96"]

    def quantized(name: str, module: str, what: str) -> Stage:
        path = work / f"bench_{name}_compile.json"  # OUT holds at most 8 files: figures go to the summary
        return Stage(f"bench_{name}_compile", f"{s['shape']} {what}, compiled decode, batch 1",
                     need_s=100 if full else 10, limit_s=160 if full else 240,
                     commands=[[*bench, "--compile", "--quantize", name, "--batch_sizes", "1",
                                "--prompt_lens", s["prefill"].split(",")[0], "--out", str(path)]],
                     figures=lambda o: _bench_figures(path), gate=_module_gate(module, name))

    return [
        Stage("preflight", "device, toolchain, tiny compile + CUDA graph, SDPA kernel per call site, "
                           "cost of a growing key length",
              need_s=0, limit_s=60 if full else 120,
              commands=[[py, "scripts/gpu_preflight.py", "--device", device,
                         "--out", str(out / "preflight.json")]],
              figures=lambda o: _preflight_figures(o / "preflight.json")),
        Stage("tests", "CUDA cases only: CUDA-graph decode = eager (fp32), Llama(compile=True) = eager, "
                       "int8 under CUDA graphs, bf16 = transformers, sampling without host syncs, "
                       "pinned attention plans, no skipped CUDA graphs",
              need_s=45 if full else 10, limit_s=150 if full else 240,
              commands=[[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *s["tests"],
                         f"--junitxml={out / 'tests.xml'}"]],
              env={"LLAMA3_TEST_DEVICE": device}, gate=_compile_gate),
        Stage("bench_bf16_compile", f"{s['shape']} bf16, compiled decode (CUDA graphs on GPU), batch 1; "
                                    f"prefill {s['prefill']}",
              need_s=100 if full else 10, limit_s=170 if full else 240,
              commands=[[*bench, "--compile", "--batch_sizes", "1", "--prompt_lens", s["prefill"],
                         "--out", str(out / "bench_bf16_compile.json")]],
              figures=lambda o: _bench_figures(o / "bench_bf16_compile.json"), gate=_compile_gate),
        Stage("bench_bf16_eager_hf",
              f"{s['shape']} bf16, eager, batch {s['batch_eager']}, against transformers",
              need_s=70 if full else 10, limit_s=150 if full else 240,
              commands=[[*bench, "--batch_sizes", s["batch_eager"], "--prompt_lens", s["prefill_eager"],
                         "--compare", "hf", "--out", str(out / "bench_bf16_eager.json")]],
              figures=lambda o: _bench_figures(o / "bench_bf16_eager.json",
                                               tuple(int(b) for b in s["batch_eager"].split(",")))),
        Stage("bench_int8_compile", f"{s['shape']} int8 weight-only, compiled decode, batch 1",
              need_s=100 if full else 10, limit_s=160 if full else 240,
              commands=[[*bench, "--compile", "--quantize", "int8", "--batch_sizes", "1", "--prompt_lens",
                         s["prefill"].split(",")[0], "--out", str(out / "bench_int8_compile.json")]],
              figures=lambda o: _bench_figures(o / "bench_int8_compile.json"), gate=_compile_gate),
        quantized("fp8", "kernels/fp8", "fp8 row-wise (torch._scaled_mm, sm89+)"),
        quantized("int4", "kernels/int4", "int4 weight-only (the int4 CUDA kernel)"),
        Stage("kernels", "prefill attention kernels and decode attention at several lengths",
              need_s=20 if full else 5, limit_s=80 if full else 120,
              commands=[[py, "scripts/gpu_kernels.py", "--device", device, "--lengths", s["kernel_lens"],
                         "--out", str(out / "kernels.json")]],
              figures=lambda o: _kernel_figures(o / "kernels.json")),
        Stage("torchrun_e2e", "torchrun, tiny checkpoint: greedy text, eager and compile=True agree",
              need_s=40 if full else 15, limit_s=120 if full else 240,
              commands=[[py, "scripts/make_tiny_checkpoint.py", str(ckpt), "--n_layers",
                         str(s["tiny_ckpt_layers"]), "--std", "0.1"],  # clear greedy margins
                        # Each run's printed text goes to a file too, for the comparison. With
                        # compilation disabled (ci) the two runs would be the same: only one.
                        *([] if size == "ci" else [_tee([*e2e, "--compile", "False"], work / "e2e_0.txt")]),
                        _tee([*e2e, "--compile", "True"], work / "e2e_1.txt"),
                        [py, "scripts/gpu_check.py", "compare-e2e", str(work)]],
              gate=_compile_gate),
        Stage("prefill_long", f"{s['shape']} bf16 eager prefill of {s['long_prefill']} tokens: fits and runs",
              need_s=40 if full else 10, limit_s=120 if full else 240,
              commands=[[*bench, "--batch_sizes", "1", "--prompt_lens", s["long_prefill"],
                         "--out", str(work / "bench_prefill_long.json")]],
              figures=lambda o: _bench_figures(work / "bench_prefill_long.json")),
    ]


# --- running -----------------------------------------------------------------------------------------


def _run_one(cmd: list[str], env: dict[str, str], timeout: float, log) -> int | None:
    """Run ``cmd`` (own process group, killed whole on timeout); returns its exit code, None on timeout."""
    log.write(f"+ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)

    def copy() -> None:  # the stage's output, as it comes, to the console and the log
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
        log.flush()

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        return proc.wait(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        return None
    finally:
        if proc.poll() is None:  # timed out or interrupted: leave nothing of it running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=5)


def run_stages(plan: list[Stage], deadline_s: float, out: Path, log, base_env: dict[str, str] | None = None,
               clock=time.monotonic, on_result=None) -> list[Result]:
    """Run ``plan`` in order under one overall deadline; returns one Result per stage.
    ``on_result(results)`` is called after each stage (the summary file is rewritten there)."""
    start = clock()
    results: list[Result] = []
    for stage in plan:
        if results and on_result is not None:
            on_result(results)
        gated = stage.gate(out) if stage.gate is not None else None
        if gated is not None:
            results.append(Result(stage.name, gated[0], detail=gated[1]))
            log.write(f"== {stage.name}: {gated[0]} ({gated[1]})\n")
            print(f"== {stage.name}: {gated[0]} ({gated[1]})", flush=True)
            continue
        left = deadline_s - (clock() - start)
        if left < stage.need_s:
            results.append(Result(stage.name, "skipped",
                                  detail=f"needs {stage.need_s:.0f} s, {max(left, 0):.0f} s left"))
            log.write(f"== {stage.name}: skipped ({results[-1].detail})\n")
            continue
        limit = min(stage.limit_s, left)
        log.write(f"== {stage.name}: {stage.what} (limit {limit:.0f} s)\n")
        print(f"== {stage.name}: {stage.what} (limit {limit:.0f} s)", flush=True)
        env = {**(base_env if base_env is not None else os.environ), **stage.env}
        t0, cpu0 = clock(), _children_cpu()
        status, detail = "passed", ""
        for cmd in stage.commands:
            rc = _run_one(cmd, env, limit - (clock() - t0), log)
            if rc is None:
                status, detail = "timeout", f"stopped after {limit:.0f} s: {' '.join(cmd[:3])}"
                break
            if rc != 0:
                status, detail = "failed", f"exit {rc}: {' '.join(cmd[:3])}"
                break
        result = Result(stage.name, status, clock() - t0, detail, _children_cpu() - cpu0)
        if stage.figures is not None:
            try:
                result.figures = stage.figures(out)
            except (OSError, ValueError, KeyError) as e:
                result.figures = {"error": f"cannot read figures: {e}"}
        results.append(result)
        log.write(f"== {stage.name}: {status} in {result.seconds:.0f} s {detail}\n")
        log.flush()
    if results and on_result is not None:
        on_result(results)
    return results


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summarize(results: list[Result], header: dict[str, Any]) -> str:
    lines = [f"# GPU check summary: {header.get('device_name', header['device'])}, size {header['size']}, "
             f"{header['seconds']:.0f} s of {header['deadline_s']:.0f} s"]
    for r in results:
        lines.append(f"{r.name:20s} {r.status:8s} {r.seconds:6.0f} s ({r.cpu_seconds:.0f} s CPU)  {r.detail}")
        for key, value in r.figures.items():
            lines.append(f"    {key}: {value}")
    for name in ("int8", "fp8", "int4"):
        ratio = header.get(f"{name}_vs_bf16_compiled")
        if ratio:
            lines.append(f"{name} / bf16 compiled decode b1: {ratio:.2f}x")
    return "\n".join(lines)


def _ratios(results: list[Result]) -> dict[str, float | None]:
    """Compiled batch-1 decode speed of each quantized format over bf16's (None where not run)."""
    figs = {r.name: r.figures for r in results}
    bf16 = figs.get("bench_bf16_compile", {}).get("compile decode_b1_tok_s")
    ratios = {}
    for name in ("int8", "fp8", "int4"):
        quant = figs.get(f"bench_{name}_compile", {}).get(f"compile+{name} decode_b1_tok_s")
        ratios[f"{name}_vs_bf16_compiled"] = quant / bf16 if bf16 and quant else None
    return ratios


def compare_e2e(work: Path) -> int:
    """The end-to-end stage's check: eager and compiled runs printed the same greedy text."""
    texts = [p.read_text() for p in sorted(work.glob("e2e_*.txt"))]
    if not texts or any(text.count("\n> ") < 2 for text in texts):
        print(f"compare-e2e: no completions printed ({len(texts)} runs in {work})")
        return 1
    if len(set(texts)) != 1:
        print("compare-e2e: eager and compile=True printed different text")
        return 1
    print(f"compare-e2e: {len(texts)} run(s) printed the same greedy text")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare-e2e"]:
        return compare_e2e(Path(argv[1]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", default=None, choices=sorted(SIZES),
                        help="default: full on cuda, tiny on cpu")
    parser.add_argument("--deadline", type=float, default=500.0, help="seconds for all stages together")
    parser.add_argument("--out", default="gpu_results")
    parser.add_argument("--stages", default=None, help="comma-separated subset of stage names")
    args = parser.parse_args(argv)
    size = args.size or ("full" if args.device == "cuda" else "tiny")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    plan = stages(args.device, size, out, work)
    if args.stages:
        wanted = args.stages.split(",")
        unknown = set(wanted) - {s.name for s in plan}
        if unknown:
            parser.error(f"unknown stages {sorted(unknown)}; choose from {[s.name for s in plan]}")
        plan = [s for s in plan if s.name in wanted]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if size == "ci":
        env["TORCH_COMPILE_DISABLE"] = "1"
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(min(os.cpu_count() or 1, 4)))
    header: dict[str, Any] = {"device": args.device, "size": size, "deadline_s": args.deadline,
                              "device_name": _device_name(args.device)}
    t0 = time.monotonic()

    def write_summary(results: list[Result], complete: bool = False) -> None:
        header["seconds"] = time.monotonic() - t0
        header.update(_ratios(results))
        summary = {**header, "complete": complete, "stages": [r.__dict__ for r in results]}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))

    with open(out / "gpu_check.log", "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {header}\n")
        results = run_stages(plan, args.deadline, out, log, env, on_result=write_summary)
        write_summary(results, complete=True)
        text = summarize(results, header)
        log.write(text + "\n")
    shutil.rmtree(work, ignore_errors=True)
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > MAX_FILES:
        text += f"\nwarning: {len(files)} files in {out}, more than {MAX_FILES} come back"
    print("\n" + text, flush=True)
    return 0 if all(r.status in ("passed", "not built") for r in results) else 1


def _tee(cmd: list[str], path: Path) -> list[str]:
    """``cmd`` with its standard output also written to ``path``."""
    return [sys.executable, str(Path(__file__).resolve()), "tee", str(path), "--", *cmd]


def _device_name(device: str) -> str:
    if device != "cuda":
        return "cpu"
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        out = subprocess.run(query, capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "cuda (nvidia-smi printed nothing)"
    except (OSError, subprocess.TimeoutExpired):
        return "cuda (no nvidia-smi)"


def _tee_main(argv: list[str]) -> int:
    path, cmd = Path(argv[0]), argv[2:]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    path.write_text(proc.stdout)
    return proc.returncode


if __name__ == "__main__":
    if sys.argv[1:2] == ["tee"]:
        sys.exit(_tee_main(sys.argv[2:]))
    sys.exit(main())
