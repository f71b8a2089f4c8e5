"""Element-wise activations: any shape in, the same shape and dtype out.

``exponential`` computes ``exp(x)`` in the dtype of ``x``. In float16 (largest finite
value 65504) ``exp(x)`` is ``inf`` for ``x > ln(65504) ≈ 11.09``, as with ``tf.exp``;
bfloat16 shares float32's range and overflows only above about 88.7.
"""

from __future__ import annotations

import tensorflow as tf
from fastlayers.kernels import dispatch
from fastlayers.kernels import flops as flops_lib
from fastlayers.kernels.auto import AUTO


def exponential_reference(x):
    """The spec: ``tf.exp`` in the dtype of ``x``."""
    return tf.exp(x)


def _work(x):
    return None if not x.shape.is_fully_defined() else flops_lib.elementwise_flops(x.shape.num_elements())


EXPONENTIAL = dispatch.Kernel(
    "exponential", exponential_reference, auto=AUTO["exponential"], work=_work
)


def exponential(x, *, implementation=None):
    """Element-wise ``exp(x)``; overflows to ``inf`` where the dtype's range ends.

    Args:
        x: floating tensor of any shape.
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``.

    Returns:
        A tensor of the shape and dtype of ``x``.
    """
    x = dispatch.floating_input(x, implementation)
    return EXPONENTIAL(x, implementation=implementation)
