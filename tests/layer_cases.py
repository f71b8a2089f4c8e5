"""One example per public layer, for the tests that must hold for every layer."""

import dataclasses
from collections.abc import Callable

import numpy as np

from fastlayers import layers


@dataclasses.dataclass(frozen=True)
class LayerCase:
    """``make(**kwargs)`` builds a new layer; ``inputs(rng)`` gives a batch for it.

    ``apply(layer, inputs)`` calls the layer on inputs of that structure, numpy or
    symbolic: ``layer(inputs)``, or with ``positional=True`` (a layer whose call takes
    several tensors, e.g. ``MultiHeadAttention(query, value)``) ``layer(*inputs)``.
    """

    name: str
    make: Callable
    inputs: Callable[[np.random.Generator], object]
    positional: bool = False

    def apply(self, layer, inputs):
        return layer(*inputs) if self.positional else layer(inputs)

    def __str__(self):
        return self.name


LAYER_CASES = [
    LayerCase("Dense", lambda **kw: layers.Dense(4, activation="relu", **kw),
              lambda rng: rng.standard_normal((3, 5))),
    LayerCase("Dense3D", lambda **kw: layers.Dense(2, kernel_regularizer="l2", **kw),
              lambda rng: rng.standard_normal((3, 7, 5))),
    LayerCase("EinsumDense",
              lambda **kw: layers.EinsumDense("abc,cde->abde", (7, 2, 3), bias_axes="de", **kw),
              lambda rng: rng.standard_normal((3, 7, 5))),
    LayerCase("Linear", lambda **kw: layers.Linear(3, **kw),
              lambda rng: rng.standard_normal((3, 5))),
    LayerCase("MaxPooling2D", lambda **kw: layers.MaxPooling2D(2, padding="same", **kw),
              lambda rng: rng.standard_normal((3, 7, 6, 2))),
    LayerCase("FixedMask", lambda **kw: layers.FixedMask([[1.0, 0.0, 2.0]] * 4, **kw),
              lambda rng: rng.standard_normal((3, 4, 3))),
    LayerCase("CenterZero", lambda **kw: layers.CenterZero((2, 2), **kw),
              lambda rng: rng.standard_normal((3, 6, 6))),
    LayerCase("Exponential", lambda **kw: layers.Exponential(**kw),
              lambda rng: rng.standard_normal((3, 5))),
    LayerCase("AttentionPooling", lambda **kw: layers.AttentionPooling(**kw),
              lambda rng: rng.standard_normal((3, 7, 5))),
    LayerCase("ResidualProjection", lambda **kw: layers.ResidualProjection(4, **kw),
              lambda rng: [rng.standard_normal((3, 6)), rng.standard_normal((3, 4))]),
    LayerCase("LayerNormalization",
              lambda **kw: layers.LayerNormalization(axis=[1, 2], beta_initializer="ones", **kw),
              lambda rng: rng.standard_normal((3, 5, 4))),
    LayerCase("RMSNormalization", lambda **kw: layers.RMSNormalization(**kw),
              lambda rng: rng.standard_normal((3, 5, 4))),
    LayerCase("MultiHeadAttention",
              lambda **kw: layers.MultiHeadAttention(num_heads=2, key_dim=3, value_dim=2, **kw),
              lambda rng: [rng.standard_normal((3, 5, 4)), rng.standard_normal((3, 7, 6))],
              positional=True),
    LayerCase("GroupQueryAttention",
              lambda **kw: layers.GroupQueryAttention(4, 4, 2, sliding_window=3, **kw),
              lambda rng: [rng.standard_normal((3, 5, 6)), rng.standard_normal((3, 7, 6))],
              positional=True),
]
