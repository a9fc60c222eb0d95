"""The plain benchmark's table: prefill and decode tok/s per implementation, % of the roofline."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, NoReturn

from llama3.cli import fire_strict


def print_table(results: dict[str, Any]) -> None:
    """One row per implementation (and its ratio to transformers when compared)."""
    machine = results["machine"]
    where = machine.get("gpu") or f"{machine['cpu']} ({machine['threads']} threads)"
    print(f"\n{where}, {results['shape']}, {results['dtype']}, bandwidth "
          f"{results['bandwidth_gb_s']['read']:.1f} GB/s, load avg {machine['load_avg_at_start']:.2f}"
          f" -> {results['load_avg_at_end']:.2f}")
    cols = ([f"prefill_{n}_tok_s" for n in results["prompt_lens"]]
            + [f"decode_b{b}_tok_s" for b in results["batch_sizes"]])
    header = ["impl", "mode"] + [c.replace("_tok_s", "") for c in cols] + [
        f"b{b} %roofline" for b in results["batch_sizes"]] + ["peak GB"]
    lines = [header]
    for row in results["rows"]:
        pct = [f"{row[f'decode_b{b}_pct_roofline']:.0f}%" if f"decode_b{b}_pct_roofline" in row else "-"
               for b in results["batch_sizes"]]
        mode = row["mode"] + (f" ({row['linear_kernels']})" if "linear_kernels" in row else "")
        lines.append([row["impl"], mode] + [f"{row.get(c, float('nan')):.2f}" for c in cols]
                     + pct + [f"{row['peak_mem_gb']:.1f}"])
        if "vs_transformers" in row:
            lines.append(["  ratio", "vs transformers"] + [
                f"{row['vs_transformers'][c]:.2f}x" if c in row["vs_transformers"] else "-" for c in cols]
                + [""] * (len(results["batch_sizes"]) + 1))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


def write_results(results: dict[str, Any], out: str | None) -> None:
    """Write a run's results as JSON to ``out`` (nothing when None) and say where."""
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"# wrote {out}")


def run_cli(main: Callable[..., Any]) -> NoReturn:
    """Run a script's ``main`` from the command line (its flags, strictly), without echoing the
    result dict it returns to Python callers."""
    @functools.wraps(main)
    def cli(*args: Any, **kwargs: Any) -> None:
        main(*args, **kwargs)
    raise SystemExit(fire_strict(cli))
