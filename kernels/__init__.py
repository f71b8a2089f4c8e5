"""fastlayers.kernels: pure functions on tensors, each with an eager reference and
compiled implementations behind one ``implementation=`` argument. No Keras state."""

from fastlayers.kernels.dense import dense, dense_compiled, dense_reference
from fastlayers.kernels.dispatch import IMPLEMENTATIONS, PLATFORMS, Kernel, kernel, platform_of
from fastlayers.kernels.elementwise import exponential, exponential_reference
from fastlayers.kernels.masking import (
    center_zero,
    center_zero_reference,
    fixed_mask,
    fixed_mask_reference,
)
from fastlayers.kernels.pooling import max_pool2d, max_pool2d_compiled, max_pool2d_reference
from fastlayers.kernels.precision import TOLERANCES, Tolerance, mask_value, tolerance
from fastlayers.kernels.residual import (
    residual_projection,
    residual_projection_compiled,
    residual_projection_reference,
)

__all__ = [
    "IMPLEMENTATIONS",
    "PLATFORMS",
    "TOLERANCES",
    "Kernel",
    "Tolerance",
    "center_zero",
    "center_zero_reference",
    "dense",
    "dense_compiled",
    "dense_reference",
    "exponential",
    "exponential_reference",
    "fixed_mask",
    "fixed_mask_reference",
    "kernel",
    "mask_value",
    "max_pool2d",
    "max_pool2d_compiled",
    "max_pool2d_reference",
    "platform_of",
    "residual_projection",
    "residual_projection_compiled",
    "residual_projection_reference",
    "tolerance",
]
