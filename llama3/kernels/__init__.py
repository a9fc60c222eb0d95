"""Linear-layer kernel families and their choice (the kernel seam's package).

This branch adds :mod:`llama3.kernels.w8a8` and :mod:`llama3.kernels.autotune`; the seam's
``base`` and chooser live beside them."""
