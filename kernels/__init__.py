"""fastlayers.kernels: pure functions on tensors, each with an eager reference and
compiled implementations behind one ``implementation=`` argument. No Keras state.

The compiled algorithms (``fastlayers.kernels.dense.dense_compiled``, ...) stay in
their modules: they take arguments the public functions have checked."""

from fastlayers.kernels.attention import (
    AttentionVariant,
    BlockSizes,
    dot_product_attention,
    dot_product_attention_reference,
)
from fastlayers.kernels.attention_pooling import (
    attention_pooling,
    attention_pooling_reference,
)
from fastlayers.kernels.dense import dense, dense_reference
from fastlayers.kernels.dispatch import (
    IMPLEMENTATIONS,
    NATIVE,
    PLATFORMS,
    Kernel,
    Selection,
    kernel,
    platform_of,
)
from fastlayers.kernels.elementwise import exponential, exponential_reference
from fastlayers.kernels.masking import (
    center_zero,
    center_zero_reference,
    fixed_mask,
    fixed_mask_reference,
)
from fastlayers.kernels.normalization import layer_normalization, rms_normalization
from fastlayers.kernels.pooling import (
    max_pool2d,
    max_pool2d_reference,
)
from fastlayers.kernels.precision import TOLERANCES, Tolerance, mask_value, tolerance
from fastlayers.kernels.residual import (
    residual_projection,
    residual_projection_reference,
)

__all__ = [
    "AttentionVariant",
    "BlockSizes",
    "IMPLEMENTATIONS",
    "Kernel",
    "NATIVE",
    "PLATFORMS",
    "Selection",
    "TOLERANCES",
    "Tolerance",
    "attention_pooling",
    "attention_pooling_reference",
    "center_zero",
    "center_zero_reference",
    "dense",
    "dense_reference",
    "dot_product_attention",
    "dot_product_attention_reference",
    "exponential",
    "exponential_reference",
    "fixed_mask",
    "fixed_mask_reference",
    "kernel",
    "layer_normalization",
    "mask_value",
    "max_pool2d",
    "max_pool2d_reference",
    "platform_of",
    "residual_projection",
    "residual_projection_reference",
    "rms_normalization",
    "tolerance",
]
