"""fastlayers.layers: drop-in fast Keras 3 layers.

Write ``from fastlayers import layers`` and ``layers.Dense(64, activation="relu")``
exactly as with ``from keras import layers``.
"""

from fastlayers.layers.base import CompiledLayer, FastLayer
from fastlayers.layers.dense import Dense
from fastlayers.layers.linear import Linear

__all__ = ["CompiledLayer", "Dense", "FastLayer", "Linear"]
