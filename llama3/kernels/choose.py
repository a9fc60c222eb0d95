"""Which kernel computes each linear layer, and why: one chooser, one table, one log line.

:func:`choose_kernels` returns a :class:`KernelPlan`: per layer family (attention projections,
feed-forward, output) the kernel family and the reason, logged in one line such as::

    kernels: attention wq/wk/wv/wo=fbgemm-fp16, feed-forward w1/w2/w3=fbgemm-fp16,
    output=fbgemm-fp16 (CPU without bf16 matrix units: FBGEMM's float16 GEMM is the fast path)

:func:`apply_kernels` swaps the layers. How to decide is :func:`decide`, one replaceable function;
a new kernel is one :class:`~llama3.kernels.base.LinearKernel` subclass and one line in ``KERNELS``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import LlamaError
from . import fbgemm as _fbgemm
from .base import LinearKernel, kernel_of, swap_linears
from .cpu_gemv import CpuGemvKernel
from .fbgemm import FbgemmFp16Kernel
from .int8 import Int8Kernel
from .torch_default import TorchKernel

__all__ = ["ENV_OVERRIDE", "FAMILIES", "KERNELS", "KernelChoice", "KernelPlan", "MIN_FBGEMM_DIM",
           "QUANTIZE_MODES", "UnknownKernelError", "apply_kernels", "choose_kernels", "decide",
           "fbgemm_is_the_fast_path"]

logger = logging.getLogger(__name__)

# The kernel families by name: a new kernel is one line here.
KERNELS: dict[str, type[LinearKernel]] = {
    TorchKernel.name: TorchKernel,
    CpuGemvKernel.name: CpuGemvKernel,
    FbgemmFp16Kernel.name: FbgemmFp16Kernel,
    Int8Kernel.name: Int8Kernel,
}
# quantize= of Llama.build -> the kernel family holding weights in that format.
QUANTIZE_MODES: dict[str, str] = {"int8": Int8Kernel.name}
# Layer families: the last component of the layer names each covers.
FAMILIES: dict[str, tuple[str, ...]] = {
    "attention": ("wq", "wk", "wv", "wo"),
    "feed-forward": ("w1", "w2", "w3"),
    "output": ("output",),
}
ENV_OVERRIDE = "LLAMA3_KERNELS"
# Below this model width a layer's product takes a few microseconds and FBGEMM's fixed cost per call
# (float32 copy of the input, dispatch) outweighs its faster arithmetic: the tiny test shapes.
MIN_FBGEMM_DIM = 1024


class UnknownKernelError(LlamaError, ValueError):
    """A kernel or layer family named in an override (or quantize=) does not exist or cannot run here."""


@dataclass(frozen=True)
class KernelChoice:
    """The kernel family of one layer family, and why it was chosen."""

    kernel: type[LinearKernel]
    reason: str

    @property
    def decode(self) -> str:
        return self.kernel.phases()[0]

    @property
    def prefill(self) -> str:
        return self.kernel.phases()[1]

    def label(self) -> str:
        decode, prefill = self.kernel.phases()
        return decode if decode == prefill else f"{decode} (decode) / {prefill} (prefill)"


@dataclass(frozen=True)
class KernelPlan:
    """Per layer family (``FAMILIES``) the chosen kernel; ``device`` and ``dtype`` it was chosen for."""

    families: dict[str, KernelChoice]
    device: torch.device
    dtype: torch.dtype

    def kernel(self, family: str) -> type[LinearKernel]:
        return self.families[family].kernel

    def describe(self) -> str:
        """The one log line: each family's kernel, then the reasons."""
        parts = [f"{family} {'/'.join(FAMILIES[family])}={choice.label()}" if family != "output"
                 else f"output={choice.label()}" for family, choice in self.families.items()]
        reasons = list(dict.fromkeys(choice.reason for choice in self.families.values()))
        return f"kernels: {', '.join(parts)} ({'; '.join(reasons)})"


def fbgemm_is_the_fast_path(device: torch.device | str, dtype: torch.dtype,
                            dim: int = MIN_FBGEMM_DIM) -> bool:
    """Whether FBGEMM packing speeds up a model of width ``dim`` in ``dtype`` on ``device``:
    bfloat16 or float16 on a CPU whose torch has FBGEMM and which lacks bfloat16 matrix units,
    and not a tiny test shape (every released Llama 3 model qualifies)."""
    return (torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16)
            and dim >= MIN_FBGEMM_DIM and _fbgemm.fbgemm_available()
            and not _fbgemm.cpu_has_bf16_matrix_units())


def decide(dim: int, device: torch.device, dtype: torch.dtype, *, quantize: str | None = None,
           fbgemm: bool | None = None) -> dict[str, tuple[str, str]]:
    """Today's rule: family -> (kernel name, reason). The one function to replace by measurement."""
    if quantize is not None:
        name, reason = QUANTIZE_MODES[quantize], f"quantize={quantize!r}: weights stored as {quantize}"
    elif fbgemm:
        name, reason = FbgemmFp16Kernel.name, "fbgemm=True"
    elif fbgemm is None and fbgemm_is_the_fast_path(device, dtype, dim):
        name, reason = FbgemmFp16Kernel.name, ("CPU without bf16 matrix units: FBGEMM's float16 GEMM "
                                               "is the fast path")
    elif CpuGemvKernel.applies(None, device, dtype):
        name, reason = CpuGemvKernel.name, (f"{dtype} on the CPU: one row as a float32-accumulating "
                                            "GEMV, several rows through torch")
    else:
        name, reason = TorchKernel.name, f"torch's kernels for {dtype} on {device.type}"
    return {family: (name, reason) for family in FAMILIES}


def _parse_override(override: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"int8"`` (every family), ``"attention=int8,output=torch"`` or a dict -> family: name."""
    if override is None or override == "":
        return {}
    if isinstance(override, str):
        if "=" not in override:
            override = dict.fromkeys(FAMILIES, override.strip())
        else:
            pairs = [item.split("=", 1) for item in override.split(",") if item.strip()]
            override = {family.strip(): name.strip() for family, name in pairs}
    for family, name in override.items():
        if family not in FAMILIES:
            raise UnknownKernelError(f"unknown layer family {family!r} in the kernel override; "
                                     f"families are {', '.join(FAMILIES)}")
        if name not in KERNELS:
            raise UnknownKernelError(f"unknown kernel {name!r} for {family}; kernels are "
                                     f"{', '.join(KERNELS)} (e.g. {ENV_OVERRIDE}=torch or "
                                     "attention=int8,output=torch)")
    return dict(override)


def choose_kernels(model: Any, device: torch.device | str, dtype: torch.dtype, quantize: str | None = None,
                   override: str | Mapping[str, str] | None = None, *, fbgemm: bool | None = None,
                   log: bool = True) -> KernelPlan:
    """The kernel of each linear-layer family of ``model`` (a Transformer, or its ``ModelArgs``
    before loading) on ``device`` in ``dtype``, and why; logged in one line.

    ``quantize``: ``"int8"`` or None. ``fbgemm``: ``Llama.build``'s flag (True: pack, False: never
    pack, None: when it is the fast path). ``override``: a kernel name for every family, or per
    family (``"attention=int8,output=torch"`` or a dict); default ``$LLAMA3_KERNELS``. Raises
    :class:`UnknownKernelError` for unknown names or a kernel that cannot run this dtype/device.
    """
    device = torch.device(device)
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise UnknownKernelError(f"unknown quantize={quantize!r}; choose one of "
                                 f"{', '.join(QUANTIZE_MODES)} or None")
    if fbgemm and quantize is not None:
        raise UnknownKernelError("fbgemm=True packs bfloat16/float16 weights; it does not combine "
                                 "with quantize")
    if fbgemm and (refusal := FbgemmFp16Kernel.refusal(None, device, dtype)):
        raise UnknownKernelError(f"fbgemm=True: {refusal}")
    args = getattr(model, "params", model)
    rule = decide(args.dim, device, dtype, quantize=quantize, fbgemm=fbgemm)
    chosen = {family: (name, reason) for family, (name, reason) in rule.items()}
    if override is None:
        override = os.environ.get(ENV_OVERRIDE) or None
    for family, name in _parse_override(override).items():
        chosen[family] = (name, "override")
    families = {}
    for family, (name, reason) in chosen.items():
        kernel = KERNELS[name]
        if refusal := kernel.refusal(None, device, dtype):
            raise UnknownKernelError(f"kernel {name} for {family}: {refusal}")
        families[family] = KernelChoice(kernel, reason)
    plan = KernelPlan(families, device, dtype)
    if log:
        logger.info(plan.describe())
    return plan


def _family_of(name: str) -> str | None:
    last = name.rpartition(".")[2]
    return next((family for family, layers in FAMILIES.items() if last in layers), None)


def apply_kernels(model: nn.Module, plan: KernelPlan) -> dict[str, int]:
    """Swap ``model``'s linear layers to the plan's kernels, in place; returns layers swapped per family."""
    swapped = {}
    for family, choice in plan.families.items():
        if choice.kernel is TorchKernel:
            swapped[family] = 0
            continue
        swapped[family] = swap_linears(model, choice.kernel,
                                       select=lambda name, _m, family=family: _family_of(name) == family)
    return swapped


def kernels_in(model: nn.Module) -> dict[str, str]:
    """Layer name -> kernel name, as the model computes now."""
    return {name: kernel_of(m).name for name, m in model.named_modules() if _family_of(name)}
