"""fastlayers.kernels: pure functions on tensors, each with an eager reference and
compiled implementations behind one ``implementation=`` argument. No Keras state."""

from fastlayers.kernels.attention import (
    BlockSizes,
    dot_product_attention,
    dot_product_attention_compiled,
    dot_product_attention_reference,
)
from fastlayers.kernels.attention_pooling import (
    attention_pooling,
    attention_pooling_compiled,
    attention_pooling_reference,
)
from fastlayers.kernels.dense import dense, dense_compiled, dense_reference
from fastlayers.kernels.dispatch import IMPLEMENTATIONS, PLATFORMS, Kernel, platform_of
from fastlayers.kernels.precision import TOLERANCES, Tolerance, mask_value, tolerance

__all__ = [
    "BlockSizes",
    "IMPLEMENTATIONS",
    "PLATFORMS",
    "TOLERANCES",
    "Kernel",
    "Tolerance",
    "attention_pooling",
    "attention_pooling_compiled",
    "attention_pooling_reference",
    "dense",
    "dense_compiled",
    "dense_reference",
    "dot_product_attention",
    "dot_product_attention_compiled",
    "dot_product_attention_reference",
    "mask_value",
    "platform_of",
    "tolerance",
]
