"""MultiHeadAttention: a drop-in for ``keras.layers.MultiHeadAttention`` whose attention
runs the memory-efficient ``kernels.dot_product_attention``."""

from __future__ import annotations

import types

import keras
from keras.src import backend as keras_backend

from fastlayers.layers import einsum_dense
from fastlayers.layers.base import ImplementationArgument, register
from fastlayers.layers.group_query_attention import attend, attention_mask_4d, check_attention_call


@register
class MultiHeadAttention(
    ImplementationArgument, einsum_dense.Int8Projections, keras.layers.MultiHeadAttention
):
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
        implementation: None (auto), ``"reference"``, ``"graph"``, ``"xla"`` or
            ``"native"``: the implementation of the attention kernel. Kept in
            ``get_config()``.
        **kwargs: the keyword arguments of ``keras.layers.MultiHeadAttention``.

    Example:

    >>> layer = MultiHeadAttention(num_heads=2, key_dim=8)
    >>> x = keras.ops.ones((3, 5, 16))
    >>> layer(x, x, use_causal_mask=True).shape
    TensorShape([3, 5, 16])
    """

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
        if key is None:
            key = value

        # The layer handles its inputs' Keras masks here, as Keras's `call` does.
        query_mask = keras_backend.get_keras_mask(query)
        keras_backend.set_keras_mask(query, None)
        keras_backend.set_keras_mask(value, None)
        keras_backend.set_keras_mask(key, None)

        # Our `_compute_attention` takes causality and the sliding window as arguments,
        # so the kernel skips the blocks above the diagonal and outside the band and no
        # [T, S] mask is built for them. They go down the call, never onto the
        # instance: one layer may be called from several threads at once. A subclass
        # that overrides `_compute_attention` (perhaps with Keras's older signature,
        # which has no `use_causal_mask`) gets them merged into `attention_mask`
        # instead, as Keras hands them over.
        own_attention = type(self)._compute_attention is MultiHeadAttention._compute_attention
        causal_flag = use_causal_mask and own_attention
        window_flag = (
            own_attention
            and self._sliding_window is not None
            and not return_attention_scores
            and len(query.shape) == 3
            and self._attention_axes in (None, (1,))
        )
        masks = dict(
            query_mask=query_mask,
            value_mask=value_mask,
            key_mask=key_mask,
            attention_mask=attention_mask,
            use_causal_mask=use_causal_mask and not causal_flag,
        )
        if window_flag:
            attention_mask = _mask_without_window(self, query, value, **masks)
        else:
            attention_mask = self._compute_attention_mask(query, value, **masks)

        # `gate`, `query` = [B, T, N, H]; `key`, `value` = [B, S, N, H]
        if self._use_gate:
            gate = self._gate_dense(query)
        query = self._query_dense(query)
        key = self._key_dense(key)
        value = self._value_dense(value)
        extra_attention_kwargs = {"use_causal_mask": True} if causal_flag else {}
        if window_flag:
            extra_attention_kwargs["sliding_window"] = self._sliding_window
        attention_output, attention_scores = self._compute_attention(
            query,
            key,
            value,
            attention_mask,
            training,
            return_attention_scores,
            **extra_attention_kwargs,
        )
        if self._use_gate:
            attention_output = keras.ops.multiply(attention_output, gate)
        attention_output = self._output_dense(attention_output)

        if query_mask is not None:
            keras_backend.set_keras_mask(attention_output, query_mask)
        if return_attention_scores:
            return attention_output, attention_scores
        return attention_output

    def _compute_attention(
        self,
        query,
        key,
        value,
        attention_mask=None,
        training=None,
        return_attention_scores=False,
        use_causal_mask=False,
        sliding_window=None,
    ):
        if return_attention_scores or len(query.shape) != 4 or self._attention_axes != (1,):
            return super()._compute_attention(
                query,
                key,
                value,
                attention_mask,
                training,
                return_attention_scores,
                use_causal_mask=use_causal_mask,
            )
        # [T, S], [B, T, S] or [B, N, T, S], as Keras accepts it: the missing axes are
        # the leading ones of [B, N], so [T, S] is one mask for every batch element and
        # head, and [B, T, S] one for every head.
        mask = None if attention_mask is None else attention_mask_4d(attention_mask)
        output = attend(
            self, query, key, value, mask, rate=self._dropout, scale=self._inverse_sqrt_key_dim,
            training=training, is_causal=use_causal_mask, sliding_window=sliding_window,
        )
        return output, None

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


def _mask_without_window(layer, query, value, **masks):
    """Keras's attention mask for ``layer`` without its sliding-window band, which the
    kernel takes as an argument: Keras's own merging of the masks, run on a view of
    the layer whose window is None (the layer itself is never changed)."""
    view = types.SimpleNamespace(_sliding_window=None, _compute_causal_mask=layer._compute_causal_mask)
    return keras.layers.MultiHeadAttention._compute_attention_mask(view, query, value, **masks)
