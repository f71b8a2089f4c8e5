"""MultiHeadAttention: a drop-in for ``keras.layers.MultiHeadAttention`` whose attention
runs the memory-efficient ``kernels.dot_product_attention``."""

from __future__ import annotations

import keras
from keras.src import backend as keras_backend

from fastlayers import kernels
from fastlayers.kernels import dispatch
from fastlayers.layers.base import register
from fastlayers.layers.group_query_attention import check_attention_call


@register
class MultiHeadAttention(keras.layers.MultiHeadAttention):
    """Multi-head attention with memory linear in the sequence length.

    A subclass of ``keras.layers.MultiHeadAttention`` (Keras 3.15): the constructor
    arguments, call signature (``query_mask``/``value_mask``/``key_mask`` through Keras
    masking, ``attention_mask``, ``use_causal_mask``, ``return_attention_scores``,
    ``training``), sublayers, weights and their order are Keras's own, so
    ``ours.set_weights(keras_layer.get_weights())`` reproduces Keras's outputs. Only
    the attention itself differs: it runs ``kernels.dot_product_attention`` (blockwise,
    never holding the ``[B, N, T, S]`` scores; causal blocks above the diagonal are
    skipped), including attention dropout in training.

    Keras's own computation runs instead when the scores are requested
    (``return_attention_scores=True``: they are the ``[B, N, T, S]`` tensor) or when
    attention spans other axes than the sequence (``attention_axes`` other than the
    default on rank-3 inputs).

    A query position whose keys are all masked (a padded query, say) attends to
    nothing: its attention output is zero, where Keras averages every value.

    Dropout draws a different pattern from Keras's (a stateless hash of the positions
    seeded from the layer's seed generator), so in training the outputs agree with
    Keras's in distribution, not value by value.

    Args:
        *args: the positional arguments of ``keras.layers.MultiHeadAttention``
            (``num_heads``, ``key_dim``, ...).
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``: the
            implementation of the attention kernel. Kept in ``get_config()``.
        **kwargs: the keyword arguments of ``keras.layers.MultiHeadAttention``.

    Example:

    >>> layer = MultiHeadAttention(num_heads=2, key_dim=8)
    >>> x = keras.ops.ones((3, 5, 16))
    >>> layer(x, x, use_causal_mask=True).shape
    TensorShape([3, 5, 16])
    """

    def __init__(self, *args, implementation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.implementation = dispatch.check_implementation(implementation)
        self._causal_only = False
        self._window_in_kernel = False

    def get_config(self):
        return {**super().get_config(), "implementation": self.implementation}

    def call(
        self,
        query,
        value,
        key=None,
        query_mask=None,
        value_mask=None,
        key_mask=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
    ):
        self._check_inputs(query, value, key)
        # Where the kernel runs, it takes the sliding window as an argument (skipping
        # the blocks outside the band) instead of Keras's [T, S] band mask.
        window_in_kernel = (
            self._sliding_window is not None
            and not return_attention_scores
            and len(query.shape) == 3
            and self._attention_axes in (None, (1,))
        )
        # Keras builds a [1, T, S] causal mask for a subclass that overrides
        # `_compute_attention`. When causality is the only mask, ask for none and
        # let the kernel skip the blocks above the diagonal instead.
        causal_only = (
            use_causal_mask
            and attention_mask is None
            and value_mask is None
            and key_mask is None
            and keras_backend.get_keras_mask(query) is None
            and (self._sliding_window is None or window_in_kernel)
        )
        self._causal_only = causal_only
        self._window_in_kernel = window_in_kernel
        try:
            return super().call(
                query,
                value,
                key=key,
                query_mask=query_mask,
                value_mask=value_mask,
                key_mask=key_mask,
                attention_mask=attention_mask,
                return_attention_scores=return_attention_scores,
                training=training,
                use_causal_mask=use_causal_mask and not causal_only,
            )
        finally:
            self._causal_only = False
            self._window_in_kernel = False

    def _check_inputs(self, query, value, key):
        """Shapes named where Keras's einsums would fail obscurely (built layers only)."""
        if not self.built:
            return
        check_attention_call(
            self, query, value, key,
            query_features=self._query_dense.kernel.shape[0],
            value_features=self._value_dense.kernel.shape[0],
            key_features=self._key_dense.kernel.shape[0],
        )

    def _compute_attention_mask(self, query, value, *args, **kwargs):
        if not self._window_in_kernel:
            return super()._compute_attention_mask(query, value, *args, **kwargs)
        window, self._sliding_window = self._sliding_window, None
        try:
            return super()._compute_attention_mask(query, value, *args, **kwargs)
        finally:
            self._sliding_window = window

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
    ):
        is_causal = use_causal_mask or self._causal_only
        if return_attention_scores or len(query.shape) != 4 or self._attention_axes != (1,):
            return super()._compute_attention(
                query,
                key,
                value,
                attention_mask,
                training,
                return_attention_scores,
                use_causal_mask=is_causal,
            )
        mask = None
        if attention_mask is not None:
            # [B, T, S] (or [1, T, S]) → [B, 1, T, S]: one mask for every head.
            mask = keras.ops.expand_dims(keras.ops.cast(attention_mask, "bool"), axis=1)
        rate = self._dropout if training else 0.0
        seed = self._dropout_layer.seed_generator.next() if rate > 0.0 else None
        output = kernels.dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            scale=self._inverse_sqrt_key_dim,
            is_causal=is_causal,
            sliding_window=self._sliding_window if self._window_in_kernel else None,
            dropout_rate=rate,
            seed=seed,
            implementation=self.implementation,
        )
        return output, None
