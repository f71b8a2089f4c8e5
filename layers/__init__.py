"""fastlayers.layers: drop-in fast Keras 3 layers.

Write ``from fastlayers import layers`` and ``layers.Dense(64, activation="relu")``
exactly as with ``from keras import layers``.
"""

from fastlayers.layers.acceleration import accelerate
from fastlayers.layers.attention_pooling import AttentionPooling
from fastlayers.layers.base import CompiledLayer, FastLayer
from fastlayers.layers.dense import Dense
from fastlayers.layers.einsum_dense import EinsumDense
from fastlayers.layers.exponential import Exponential
from fastlayers.layers.group_query_attention import GroupedQueryAttention, GroupQueryAttention
from fastlayers.layers.linear import Linear
from fastlayers.layers.masking import CenterZero, FixedMask
from fastlayers.layers.multi_head_attention import MultiHeadAttention
from fastlayers.layers.normalization import LayerNormalization, RMSNormalization
from fastlayers.layers.pooling import MaxPool2D, MaxPooling2D
from fastlayers.layers.residual import ResidualProjection

__all__ = [
    "AttentionPooling",
    "CenterZero",
    "CompiledLayer",
    "Dense",
    "EinsumDense",
    "Exponential",
    "FastLayer",
    "FixedMask",
    "GroupQueryAttention",
    "GroupedQueryAttention",
    "LayerNormalization",
    "Linear",
    "MaxPool2D",
    "MaxPooling2D",
    "MultiHeadAttention",
    "RMSNormalization",
    "ResidualProjection",
    "accelerate",
]
