"""Which kernel computes each linear layer, and why: one chooser, one table, one log line.

:func:`choose_kernels` returns a :class:`KernelPlan`: per layer family (attention projections,
feed-forward, output) the kernel family and the reason, logged in one line such as::

    kernels: attention wq/wk/wv/wo=fbgemm-fp16, feed-forward w1/w2/w3=fbgemm-fp16,
    output=fbgemm-fp16 (CPU without bf16 matrix units: FBGEMM's float16 GEMM is the fast path)

:func:`apply_kernels` swaps the layers. How to decide is :func:`decide`, one replaceable function;
a new kernel is one :class:`~llama3.kernels.base.LinearKernel` subclass and one line in ``KERNELS``.

``quantize=`` converts the families in ``QUANTIZED_FAMILIES`` (fp8: only Meta's selection of
feed-forward layers, a :class:`KernelChoice` with ``layers``); a checkpoint shipped quantized
(``stored=``) keeps its layers' format and the chooser only reports it, so the log line and the fit
check's bytes cover every case.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import LlamaError
from . import autotune
from . import fbgemm as _fbgemm
from .base import LinearKernel, kernel_of, swap_linears
from .cpu_gemv import CpuGemvKernel, CpuGemvNativeKernel
from .fbgemm import FbgemmFp16Kernel
from .fp8 import Fp8RowwiseLinear, meta_fp8_layers
from .int4 import INT4_GROUP_SIZES, Int4WeightOnlyLinear, Int8DynActInt4Linear, UnsupportedGroupSizeError
from .int4_dequant import Int4DequantLinear
from .int8 import Int8Kernel
from .measure import Tuning, measure_family, why_not_measured
from .phases import PhaseKernel, phase_kernel
from .torch_default import TorchKernel
from .w8a8 import W8A8IntMmKernel, W8A8Kernel

__all__ = ["ENV_OVERRIDE", "FAMILIES", "FLOAT_CANDIDATES", "KERNELS", "KernelChoice", "KernelPlan",
           "MIN_FBGEMM_DIM", "MODE_CANDIDATES", "QUANTIZED_FAMILIES", "QUANTIZE_MODES", "StoredQuantization",
           "Tuning", "UnknownKernelError",
           "apply_kernels",
           "check_int4_group_size", "choose_kernels", "default_int4_group_size", "decide",
           "fbgemm_is_the_fast_path",
           "quantized_alternatives", "quantized_layers"]

logger = logging.getLogger(__name__)

# The kernel families by name: a new kernel is one line here.
KERNELS: dict[str, type[LinearKernel]] = {
    TorchKernel.name: TorchKernel,
    CpuGemvKernel.name: CpuGemvKernel,
    CpuGemvNativeKernel.name: CpuGemvNativeKernel,
    FbgemmFp16Kernel.name: FbgemmFp16Kernel,
    Int8Kernel.name: Int8Kernel,
    Fp8RowwiseLinear.name: Fp8RowwiseLinear,  # settings: activation_scale_ub
    Int4WeightOnlyLinear.name: Int4WeightOnlyLinear,  # settings: group_size
    Int4DequantLinear.name: Int4DequantLinear,  # settings: group_size (int4's buffers, prefill)
    Int8DynActInt4Linear.name: Int8DynActInt4Linear,  # settings: group_size, lora_rank, lora_scale, dtype
    W8A8Kernel.name: W8A8Kernel,
    W8A8IntMmKernel.name: W8A8IntMmKernel,
}
# quantize= of Llama.build -> the kernel family holding weights in that format.
QUANTIZE_MODES: dict[str, str] = {"int8": Int8Kernel.name, "fp8": Fp8RowwiseLinear.name,
                                  "int4": Int4WeightOnlyLinear.name, "w8a8": W8A8Kernel.name}
# The kernels measured against each other on the CPU (the ones that apply), for a float model and
# for each quantize mode with several kernels; a mode with one kernel needs no timing.
FLOAT_CANDIDATES: tuple[type[LinearKernel], ...] = (TorchKernel, CpuGemvKernel, CpuGemvNativeKernel,
                                                    FbgemmFp16Kernel)
MODE_CANDIDATES: dict[str, tuple[type[LinearKernel], ...]] = {
    "w8a8": (W8A8Kernel, W8A8IntMmKernel), "int4": (Int4WeightOnlyLinear, Int4DequantLinear)}
# Layer families: the last component of the layer names each covers.
FAMILIES: dict[str, tuple[str, ...]] = {
    "attention": ("wq", "wk", "wv", "wo"),
    "feed-forward": ("w1", "w2", "w3"),
    "output": ("output",),
}
# The layer families each quantize mode converts; the others keep the float rule. fp8 is Meta's
# fp8_mixed selection (feed-forward of every layer but the first and the last, see
# :func:`quantized_layers`); int4 converts every linear, the output projection too, as torchao's
# and gpt-fast's int4 and llama.cpp's Q4_0 do: the output projection is the largest matrix of the
# small models (a third of Llama 3.2 1B's weight bytes), and keeping it in bf16 costs decode speed
# a 4-bit mode is chosen for. ``LLAMA3_KERNELS=output=torch`` keeps it float (more accurate).
QUANTIZED_FAMILIES: dict[str, tuple[str, ...]] = {"int8": tuple(FAMILIES), "fp8": ("feed-forward",),
                                                  "int4": tuple(FAMILIES), "w8a8": tuple(FAMILIES)}
ENV_OVERRIDE = "LLAMA3_KERNELS"
# Below this model width a layer's product takes a few microseconds and FBGEMM's fixed cost per call
# (float32 copy of the input, dispatch) outweighs its faster arithmetic: the tiny test shapes.
MIN_FBGEMM_DIM = 1024


class UnknownKernelError(LlamaError, ValueError):
    """A kernel or layer family named in an override (or quantize=) does not exist or cannot run here."""


class StoredQuantization(Protocol):
    """What a checkpoint shipped already quantized says about itself
    (:class:`llama3.checkpoint.QuantizedFormat` is one)."""

    @property
    def kernel(self) -> str: ...
    def quantized_layers(self, args: Any) -> list[str]: ...
    def kernel_settings(self, dtype: torch.dtype) -> dict[str, Any]: ...
    def describe(self) -> str: ...


@dataclass(frozen=True)
class KernelChoice:
    """The kernel family of one layer family, and why it was chosen. ``layers``: the names of the
    layers it computes when not all of the family (fp8: Meta's selection); the others keep torch's
    kernel. ``settings``: keyword arguments of the kernel's ``from_float`` (int4's group size).
    ``one_layout``: for a kernel holding two weight layouts (decode + prefill), the choice holding
    one (the decode winner), taken when both would not fit in memory."""

    kernel: type[LinearKernel]
    reason: str
    layers: frozenset[str] | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    one_layout: KernelChoice | None = None

    def computes(self, name: str) -> bool:
        """Whether layer ``name`` (of this family) is computed by :attr:`kernel`."""
        return self.layers is None or name in self.layers

    @property
    def decode(self) -> str:
        return self.kernel.phases()[0]

    @property
    def prefill(self) -> str:
        return self.kernel.phases()[1]

    def label(self) -> str:
        decode, prefill = self.kernel.phases()
        label = decode if decode == prefill else f"{decode} (decode) / {prefill} (prefill)"
        if self.settings.get("group_size"):
            label += f" group {self.settings['group_size']}"
        if self.layers is not None:
            blocks = sorted({int(n.split(".")[1]) for n in self.layers if n.startswith("layers.")})
            if blocks:
                label += f" in layers {_ranges(blocks)} (the others torch)"
        return label


def _ranges(values: list[int]) -> str:
    """[1, 2, 3, 5] -> "1-3,5"."""
    out: list[str] = []
    for v in values:
        if out and out[-1].split("-")[-1] == str(v - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{v}"
        else:
            out.append(str(v))
    return ",".join(out)


@dataclass(frozen=True)
class KernelPlan:
    """Per layer family (``FAMILIES``) the chosen kernel; ``device`` and ``dtype`` it was chosen for."""

    families: dict[str, KernelChoice]
    device: torch.device
    dtype: torch.dtype

    def kernel(self, family: str) -> type[LinearKernel]:
        return self.families[family].kernel

    def nbytes(self, name: str, out_features: int, in_features: int, dtype: torch.dtype) -> int:
        """Bytes layer ``name`` (``layers.3.feed_forward.w1``, ``output``) holds in its kernel's
        format, with the plan's settings (a layer left out of a partial selection: ``dtype``)."""
        choice = self.families[_family_of(name) or "output"]
        if not choice.computes(name):
            return LinearKernel.nbytes_for(out_features, in_features, dtype)
        group = {"group_size": choice.settings["group_size"]} if "group_size" in choice.settings else {}
        return choice.kernel.nbytes_for(out_features, in_features, dtype, **group)

    def with_one_layout(self) -> KernelPlan:
        """This plan with every two-layout choice replaced by its one-layout choice (itself when none)."""
        if all(c.one_layout is None for c in self.families.values()):
            return self
        return replace(self, families={f: c.one_layout or c for f, c in self.families.items()})

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
    """The rule when nothing is measured: family -> (kernel name, reason).

    Used off the CPU (CUDA: torch's kernels), for widths below ``MIN_FBGEMM_DIM`` (test shapes),
    for quantize modes with one kernel, and as the documented fallback on the CPU when measuring
    is impossible (``Tuning(enabled=False)``, model-parallel ranks, a measurement that failed):
    there the CPU flags decide FBGEMM packing (:func:`fbgemm_is_the_fast_path`), which was wrong
    on one of the three CPU classes measured; :func:`choose_kernels` measures instead."""
    if quantize is not None:
        name, reason = QUANTIZE_MODES[quantize], f"quantize={quantize!r}: weights stored as {quantize}"
        if not KERNELS[name].applies(None, device, dtype):  # w8a8 without oneDNN: the portable kernel
            name = next((k.name for k in MODE_CANDIDATES.get(quantize, ()) if k.applies(None, device, dtype)),
                        name)
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


def _parse_override(override: str | Mapping[str, str] | None) -> dict[str, dict[str, str]]:
    """The override as family -> {phase: kernel name}. A string is comma-separated entries, each
    ``NAME`` (every family, both phases), ``FAMILY=NAME``, ``PHASE=NAME`` or ``FAMILY:PHASE=NAME``
    (``"int8"``, ``"attention=int8,output=torch"``, ``"decode=fbgemm-fp16,prefill=torch"``); a
    dict maps families to names. An entry for a named family beats one for every family."""
    if override is None or override == "":
        return {}
    entries: list[tuple[str, str, str]] = []  # (family or "", phase or "", name)
    if isinstance(override, str):
        for item in override.split(","):
            if not (item := item.strip()):
                continue
            scope, _, name = item.rpartition("=")
            family, _, phase = scope.rpartition(":")
            if not family and phase in FAMILIES:  # FAMILY=NAME
                family, phase = phase, ""
            if phase and phase not in autotune.PHASES or not name.strip():
                raise UnknownKernelError(
                    f"cannot read the kernel override entry {item!r}: write NAME, FAMILY=NAME, PHASE=NAME "
                    f"or FAMILY:PHASE=NAME, with PHASE one of {', '.join(autotune.PHASES)} (e.g. "
                    f"{ENV_OVERRIDE}=decode=fbgemm-fp16,prefill=torch or attention=int8,output=torch)")
            entries.append((family.strip(), phase, name.strip()))
    else:
        entries = [(family, "", name) for family, name in override.items()]
    forced: dict[str, dict[str, str]] = {}
    for family, phase, name in sorted(entries, key=lambda e: bool(e[0])):  # every family first
        if family and family not in FAMILIES:
            raise UnknownKernelError(f"unknown layer family {family!r} in the kernel override; "
                                     f"families are {', '.join(FAMILIES)}")
        if name not in KERNELS:
            raise UnknownKernelError(f"unknown kernel {name!r}{' for ' + family if family else ''}; kernels "
                                     f"are {', '.join(KERNELS)} (e.g. {ENV_OVERRIDE}=torch or "
                                     "attention=int8,output=torch)")
        for f in [family] if family else FAMILIES:
            for p in [phase] if phase else autotune.PHASES:
                forced.setdefault(f, {})[p] = name
    return forced


def quantized_layers(quantize: str, args: Any) -> frozenset[str] | None:
    """The layers ``quantize`` converts within its families (None: all of them)."""
    return frozenset(meta_fp8_layers(args.n_layers)) if quantize == "fp8" else None


def default_int4_group_size(args: Any) -> int:
    """128, or the largest of 64 and 32 that divides the model's widths (every released Llama 3
    takes 128)."""
    return next((g for g in (128, 64) if args.dim % g == 0 and args.ffn_hidden_dim % g == 0), 32)


def check_int4_group_size(group_size: Any) -> int:
    """``group_size`` if torch's int4 kernels take it, else :class:`UnsupportedGroupSizeError`."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in INT4_GROUP_SIZES:
        sizes = ", ".join(map(str, INT4_GROUP_SIZES))
        raise UnsupportedGroupSizeError(f"int4_group_size must be one of {sizes} (torch's int4 kernels), "
                                        f"got {group_size!r}")
    return group_size


def choose_kernels(model: Any, device: torch.device | str, dtype: torch.dtype, quantize: str | None = None,
                   override: str | Mapping[str, str] | None = None, *, fbgemm: bool | None = None,
                   log: bool = True, int4_group_size: int | None = None,
                   stored: StoredQuantization | None = None, tuning: Tuning | None = None
                   ) -> KernelPlan:
    """The kernel of each linear-layer family of ``model`` (a Transformer, or its ``ModelArgs``
    before loading) on ``device`` in ``dtype``, and why; logged in one line.

    On the CPU, where several kernels can serve a family (torch, cpu-gemv, cpu-gemv-native and
    fbgemm-fp16 for a bfloat16/float16 model; the w8a8 kernels with ``quantize="w8a8"``; int4 and
    int4-dequant, which share one layout, with ``quantize="int4"``), they are measured on one pass
    through a block's layers of the family (:mod:`llama3.kernels.measure`: one row for decoding,
    from memory, and a prefill chunk, about 0.3 s per family, the result cached per machine) and the
    fastest serves each phase; both layouts are kept only where the prefill gain pays
    (``KernelChoice.one_layout`` is the fallback the fit check takes when both do not fit).
    Elsewhere :func:`decide`'s rule.

    ``quantize``: a ``QUANTIZE_MODES`` key (``"int8"``, ``"w8a8"``: int8 weights and activations,
    ``"fp8"``: Meta's fp8_mixed selection, ``"int4"``: every linear, group-wise with
    ``int4_group_size``, default :func:`default_int4_group_size`) or None. ``stored``: the
    format of a checkpoint shipped quantized (its layers keep their stored kernel; quantize= is
    then refused). ``fbgemm``: ``Llama.build``'s flag (True: pack, False: never pack, None: when it
    measures fastest). ``override``: see :func:`_parse_override` (a kernel name for every family,
    per family, per phase); default ``$LLAMA3_KERNELS``. ``tuning``: how to measure
    (:class:`Tuning`). Raises :class:`UnknownKernelError` for unknown names or a kernel that
    cannot run this dtype/device.
    """
    device = torch.device(device)
    tuning = tuning or Tuning()
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise UnknownKernelError(f"unknown quantize={quantize!r}; choose one of "
                                 f"{', '.join(QUANTIZE_MODES)} or None")
    if fbgemm and quantize is not None:
        raise UnknownKernelError("fbgemm=True packs bfloat16/float16 weights; it does not combine "
                                 "with quantize")
    if int4_group_size is not None and quantize != "int4":
        raise UnknownKernelError(f"int4_group_size={int4_group_size!r} applies to quantize='int4' only "
                                 f"(got quantize={quantize!r})")
    if stored is not None and quantize is not None:
        raise UnknownKernelError(f"quantize={quantize!r}: this checkpoint is already quantized "
                                 f"({stored.describe()}); load it without quantize=")
    if fbgemm and (refusal := FbgemmFp16Kernel.refusal(None, device, dtype)):
        raise UnknownKernelError(f"fbgemm=True: {refusal}")
    args = getattr(model, "params", model)
    forced = _parse_override(os.environ.get(ENV_OVERRIDE) or None if override is None else override)
    # Which families are measured, among which kernels; the rest follow the rule.
    why_not = why_not_measured(args, device, tuning)
    candidates: dict[str, list[type[LinearKernel]]] = {}
    if quantize is None and not fbgemm and stored is None or quantize in MODE_CANDIDATES:
        pool = MODE_CANDIDATES[quantize] if quantize else FLOAT_CANDIDATES
        pool = tuple(k for k in pool if k.applies(None, device, dtype)
                     and not (fbgemm is False and k is FbgemmFp16Kernel))
        if len(pool) > 1 and why_not:
            logger.debug("kernels not measured: %s", why_not)
        elif len(pool) > 1:
            families = QUANTIZED_FAMILIES[quantize] if quantize else FAMILIES
            candidates = {f: list(pool) for f in families if forced.get(f, {}).keys() != set(autotune.PHASES)}
    # The float rule for every family, then the quantized families on top.
    rule = decide(args.dim, device, dtype, fbgemm=False if quantize or stored else fbgemm)
    chosen = {family: KernelChoice(KERNELS[name], reason) for family, (name, reason) in rule.items()}
    settings: dict[str, Any] = {}
    if quantize is not None:
        group = default_int4_group_size(args) if int4_group_size is None else int4_group_size
        settings = {"group_size": check_int4_group_size(group)} if quantize == "int4" else {}
        name = decide(args.dim, device, dtype, quantize=quantize)["attention"][0]
        for family in QUANTIZED_FAMILIES[quantize]:
            chosen[family] = KernelChoice(KERNELS[name],
                                          f"quantize={quantize!r}: weights stored as {quantize}",
                                          quantized_layers(quantize, args), settings)
    if stored is not None:
        names = stored.quantized_layers(args)
        for family in FAMILIES:
            mine = frozenset(n for n in names if _family_of(n) == family)
            if mine:
                chosen[family] = KernelChoice(KERNELS[stored.kernel],
                                              f"the checkpoint ships {stored.describe()}", mine,
                                              stored.kernel_settings(dtype))
                candidates.pop(family, None)
    measured = set()
    for family, pool in candidates.items():
        try:
            got = measure_family(family, pool, args, dtype, tuning,
                                 {p: KERNELS[n] for p, n in forced.get(family, {}).items()},
                                 settings=chosen[family].settings)
            one = KernelChoice(got.one_layout, got.reason + "; one layout: both would not fit in memory",
                               settings=chosen[family].settings)
            chosen[family] = KernelChoice(got.kernel, got.reason, settings=chosen[family].settings,
                                          one_layout=one if got.one_layout else None)
            measured.add(family)
        except (RuntimeError, MemoryError) as e:  # measuring failed: the rule, and say so
            logger.warning("could not measure the kernels for %s (%s); using the rule: %s", family, e,
                           chosen[family].reason)
    # The quantize mode's kernels (forced on another family too) take the mode's settings (int4's group).
    mode_kernels = ({KERNELS[QUANTIZE_MODES[quantize]], *MODE_CANDIDATES.get(quantize, ())} if quantize
                    else set())
    for family, phases in forced.items():
        if family in measured:
            continue  # a partly forced family: measure_family took the forced phase
        kernel = phase_kernel(KERNELS[phases.get("decode", chosen[family].kernel.name)],
                              KERNELS[phases.get("prefill", chosen[family].kernel.name)])
        parts = kernel.kernels if issubclass(kernel, PhaseKernel) else (kernel,)
        chosen[family] = KernelChoice(kernel, "override",
                                      settings=settings if mode_kernels.issuperset(parts) else {})
    families = {}
    for family, choice in chosen.items():
        if refusal := choice.kernel.refusal(None, device, dtype):
            raise UnknownKernelError(f"kernel {choice.kernel.name} for {family}: {refusal}")
        families[family] = choice
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
        def select(name: str, _module: nn.Module, family: str = family,
                   choice: KernelChoice = choice) -> bool:
            return _family_of(name) == family and choice.computes(name)

        swapped[family] = swap_linears(model, choice.kernel, select=select, **choice.settings)
    return swapped


def quantized_alternatives(args: Any, device: torch.device | str, dtype: torch.dtype
                           ) -> dict[str, KernelPlan]:
    """The plan of each quantize mode that would shrink a float model (for the fit check's advice)."""
    plans = {}
    for mode in ("fp8", "int4"):
        try:
            plans[mode] = choose_kernels(args, device, dtype, mode, override={}, log=False,
                                         tuning=Tuning(enabled=False))  # only their bytes matter
        except UnknownKernelError:  # that format cannot run here: not advice worth giving
            continue
    return plans


def kernels_in(model: nn.Module) -> dict[str, str]:
    """Layer name -> kernel name, as the model computes now."""
    return {name: kernel_of(m).name for name, m in model.named_modules() if _family_of(name)}
