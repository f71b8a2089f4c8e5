"""fastlayers.kernels: pure functions on tensors, each with an eager reference and
compiled implementations behind one ``implementation=`` argument. No Keras state."""

from fastlayers.kernels.dense import dense, dense_compiled, dense_reference
from fastlayers.kernels.dispatch import IMPLEMENTATIONS, PLATFORMS, Kernel, kernel, platform_of
from fastlayers.kernels.precision import TOLERANCES, Tolerance, mask_value, tolerance

__all__ = [
    "IMPLEMENTATIONS",
    "PLATFORMS",
    "TOLERANCES",
    "Kernel",
    "Tolerance",
    "dense",
    "dense_compiled",
    "dense_reference",
    "kernel",
    "mask_value",
    "platform_of",
    "tolerance",
]
