"""fastlayers.kernels.native: C++ TensorFlow ops built on first use against the
installed TensorFlow (``build``) into one library, and their Python entry points
(``attention``, ``normalization``)."""

from fastlayers.kernels.native.attention import (
    NATIVE,
    NativeAttention,
    build_status,
    dot_product_attention_native,
    not_built_reason,
    not_supported_reasons,
)
from fastlayers.kernels.native.build import BuildError, cache_root

__all__ = [
    "NATIVE",
    "BuildError",
    "NativeAttention",
    "build_status",
    "cache_root",
    "dot_product_attention_native",
    "not_built_reason",
    "not_supported_reasons",
]
