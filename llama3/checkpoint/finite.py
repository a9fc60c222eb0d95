"""Non-finite weights are found at load, naming the file and the tensor.

One NaN in a weight need not show in the logits (torch's CPU attention kernel turns a NaN in a
query into a finite output), so a corrupt shard could load without a word and produce fluent
nonsense. Every tensor is checked as it is loaded: one ``aminmax`` reduction (NaN propagates into
both results, an infinity shows in one), a single pass at memory speed over a tensor that was just
written, no tensor-sized temporary. The per-tensor verdicts stay on the device and are read back
once, at the end; only when one fails are the files searched to name where the values came from.
``NonFiniteLogitsError`` at generation stays the second line of defence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointFormatError
from .hf import to_hf_name
from .meta import torch_load

__all__ = ["FiniteCheck", "NonFiniteWeightsError", "stored_tensors"]


class NonFiniteWeightsError(CheckpointFormatError):
    """A checkpoint tensor holds NaN or infinite values (or overflows the dtype it is loaded in)."""


class FiniteCheck:
    """Collects a finiteness verdict per loaded tensor (:meth:`see`), then :meth:`verify` raises
    :class:`NonFiniteWeightsError` naming the first bad tensor and its file."""

    def __init__(self) -> None:
        self._verdicts: list[tuple[int, torch.Tensor]] = []

    def see(self, tensor: torch.Tensor) -> None:
        """Record whether ``tensor`` is all finite (asynchronously on an accelerator)."""
        if not tensor.is_floating_point() or tensor.numel() == 0:
            return
        low, high = torch.aminmax(tensor.reshape(-1))
        self._verdicts.append((id(tensor), torch.isfinite(low) & torch.isfinite(high)))

    def verify(self, state_dict: dict[str, torch.Tensor], info: Any, source_of: Any = None) -> None:
        """Raise if any tensor seen is not finite. ``source_of(name)`` lists ``(path, tensor)``
        pairs of where ``name`` was read from, to name the file (called only on failure)."""
        if not self._verdicts:
            return
        ok = torch.stack([v for _, v in self._verdicts]).cpu().tolist()
        bad_ids = {key for (key, _), good in zip(self._verdicts, ok, strict=True) if not good}
        self._verdicts.clear()
        if not bad_ids:
            return
        names = [name for name, t in state_dict.items() if id(t) in bad_ids]
        raise NonFiniteWeightsError(_describe(names, state_dict, info, source_of))


def _counts(tensor: torch.Tensor) -> tuple[int, int]:
    return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())


def _describe(names: list[str], state_dict: dict[str, torch.Tensor], info: Any, source_of: Any) -> str:
    name = names[0]
    loaded = state_dict[name]
    nan, inf = _counts(loaded)
    files: list[Path] = []
    source_finite = True
    if source_of is not None:
        try:
            for path, stored in source_of(name):
                if not bool(torch.isfinite(stored).all()):
                    files.append(Path(path))
                    source_finite = False
        except Exception:  # noqa: BLE001 - naming the file is a courtesy; the error stands anyway
            pass
    where = (" in " + ", ".join(str(p) for p in files)) if files else f" in {getattr(info, 'path', '')}"
    others = f" (and {len(names) - 1} more tensor(s))" if len(names) > 1 else ""
    if source_of is not None and source_finite and not files:
        dtype = str(loaded.dtype).removeprefix("torch.")
        return (f"checkpoint tensor {name}{where} overflows {dtype}: {inf} value(s) become infinite{others}. "
                "Load it in a wider dtype (bfloat16 or float32).")
    return (f"checkpoint tensor {name}{where} holds {nan} NaN and {inf} infinite value(s){others}: the file "
            "is corrupt (an interrupted download or a disk error); get it again. Nothing was loaded.")


def stored_tensors(info: Any, name: str) -> list[tuple[Path, torch.Tensor]]:
    """Every ``(file, tensor)`` of the checkpoint ``info`` that stores ``name`` (our name), as it is
    in the file: what a failed check searches to name the file."""
    found = []
    if info.format == "meta":
        for path in info.files:
            sd = torch_load(path)
            if name in sd:
                found.append((path, sd[name]))
    else:
        from safetensors import safe_open

        stored = to_hf_name(name)
        for path in info.files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                if stored in f.keys():
                    found.append((path, f.get_tensor(stored)))
    return found
