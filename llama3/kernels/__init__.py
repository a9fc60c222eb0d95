"""Linear-layer kernels: one seam (:mod:`.base`), one family per module, one chooser (:mod:`.choose`).

* :class:`LinearKernel` — subclass it to add a kernel (override ``local_product``, the weight's
  format and ``applies``), then add one line to ``KERNELS`` in :mod:`.choose`;
* :func:`choose_kernels` / :func:`apply_kernels` — which kernel computes each layer family (on the
  CPU: measured, :mod:`.autotune`; per phase, :mod:`.phases`), and why.
"""

from .base import LinearKernel, empty_linear, is_linear, kernel_of, swap_linear, swap_linears
from .choose import (
    ENV_OVERRIDE,
    FAMILIES,
    KERNELS,
    QUANTIZE_MODES,
    QUANTIZED_FAMILIES,
    KernelChoice,
    KernelPlan,
    Tuning,
    UnknownKernelError,
    apply_kernels,
    choose_kernels,
    decide,
    fbgemm_is_the_fast_path,
    kernels_in,
    quantized_alternatives,
)
from .cpu_gemv import CpuGemvKernel, CpuGemvNativeKernel
from .fbgemm import FbgemmFp16Kernel, cpu_has_bf16_matrix_units, fbgemm_available
from .fp8 import Fp8RowwiseLinear
from .int4 import Int4WeightOnlyLinear, Int8DynActInt4Linear
from .int8 import Int8Kernel, quantize_per_channel
from .phases import PhaseKernel, phase_kernel
from .torch_default import TorchKernel
from .w8a8 import W8A8IntMmKernel, W8A8Kernel

__all__ = [
    "ENV_OVERRIDE", "FAMILIES", "KERNELS", "QUANTIZE_MODES", "CpuGemvKernel", "CpuGemvNativeKernel",
    "FbgemmFp16Kernel",
    "Int8Kernel", "Fp8RowwiseLinear", "Int4WeightOnlyLinear", "Int8DynActInt4Linear", "QUANTIZED_FAMILIES",
    "quantized_alternatives",
    "KernelChoice", "KernelPlan", "LinearKernel", "PhaseKernel", "TorchKernel", "Tuning",
    "UnknownKernelError",
    "W8A8IntMmKernel", "W8A8Kernel", "apply_kernels", "phase_kernel",
    "choose_kernels", "cpu_has_bf16_matrix_units", "decide", "empty_linear", "fbgemm_available",
    "fbgemm_is_the_fast_path", "is_linear", "kernel_of", "kernels_in", "quantize_per_channel", "swap_linear",
    "swap_linears",
]
