"""fastlayers.layers: drop-in fast Keras 3 layers.

Write ``from fastlayers import layers`` and ``layers.Dense(64, activation="relu")``
exactly as with ``from keras import layers``.
"""

from fastlayers.layers.attention_pooling import AttentionPooling
from fastlayers.layers.base import FastLayer
from fastlayers.layers.dense import Dense
from fastlayers.layers.linear import Linear
from fastlayers.layers.multi_head_attention import MultiHeadAttention

__all__ = ["AttentionPooling", "Dense", "FastLayer", "Linear", "MultiHeadAttention"]
