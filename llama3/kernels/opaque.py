"""Products on weights torch.compile cannot trace, as one opaque op of a compiled step.

FBGEMM's packed float16 weight and oneDNN's packed int8 weight are objects dynamo cannot put in a
graph. Marking their products ``@torch.compiler.disable`` splits a compiled decoding step at every
linear layer (29 graph breaks in a 4-layer model), and each break costs the Python of leaving and
re-entering compiled code: on the AMX Xeon the compiled float16 step (FBGEMM) ran 0.95x the eager
one. Instead each layer registers its product here under an integer handle, and the compiled step
calls ``llama3::opaque_product(x, handle, out_features)``: the graph holds the handle as a constant
and stays whole; eagerly the layer calls its product directly. The registry holds the product (which
holds the packed weight, never the layer); the layer's finalizer removes it.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable

import torch

__all__ = ["opaque_product", "register_product"]

Product = Callable[[torch.Tensor], torch.Tensor]
_PRODUCTS: dict[int, Product] = {}
_HANDLES = itertools.count()


def register_product(owner: object, product: Product) -> int:
    """The handle of ``product`` (x [..., in] -> [..., out] in x's dtype), registered until
    ``owner`` is garbage-collected. ``product`` must not refer to ``owner``, or it never is."""
    handle = next(_HANDLES)
    _PRODUCTS[handle] = product
    weakref.finalize(owner, _PRODUCTS.pop, handle, None)
    return handle


@torch.library.custom_op("llama3::opaque_product", mutates_args=())
def opaque_product(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    """The registered product ``handle`` of ``x``."""
    product = _PRODUCTS.get(handle)
    if product is None:  # e.g. a copy.deepcopy of a layer whose original was collected
        raise RuntimeError(f"the packed product {handle} of this layer is gone (its original layer "
                           "was garbage-collected); swap the layer to its kernel again instead of copying it")
    return product(x)


@opaque_product.register_fake
def _(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))
