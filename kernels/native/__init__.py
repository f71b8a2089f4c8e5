"""fastlayers.kernels.native: C++ TensorFlow ops built on first use against the
installed TensorFlow (``build``), and their Python entry points (``attention``)."""

from fastlayers.kernels.native.attention import (
    build_status,
    dot_product_attention_native,
    in_xla_cluster,
    not_supported_reasons,
)
from fastlayers.kernels.native.build import BuildError, cache_root

__all__ = [
    "BuildError",
    "build_status",
    "cache_root",
    "dot_product_attention_native",
    "in_xla_cluster",
    "not_supported_reasons",
]
