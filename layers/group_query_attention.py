"""GroupQueryAttention: a drop-in for ``keras.layers.GroupQueryAttention`` (alias
``GroupedQueryAttention``) whose attention runs ``kernels.dot_product_attention`` on the
key/value heads as they are, with sliding windows as block skipping."""

from __future__ import annotations

import keras
from keras import ops

from fastlayers import kernels
from fastlayers.layers import einsum_dense
from fastlayers.layers.base import ImplementationArgument, register


def check_attention_call(layer, query, value, key, *, query_features, value_features, key_features):
    """Raises a ValueError naming the shapes when ``query``, ``value`` and ``key`` are not
    the rank-3 ``[B, T|S, features]`` tensors the layer's projections were built for.

    Keras's layers fail on such calls deep inside an einsum; this says what was wrong.
    ``*_features`` are the feature sizes the built weights take (None: not built).
    """
    tensors = {"query": query, "value": value, "key": key}
    shapes = ", ".join(f"{name}.shape={tuple(t.shape)}" for name, t in tensors.items() if t is not None)
    ranks = {name: len(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(ranks.values())) > 1:
        raise ValueError(
            f"`query`, `value` and `key` passed to {layer.name} must have the same rank "
            f"([B, T, features] and [B, S, features]). Received: {shapes}"
        )
    features = {"query": query_features, "value": value_features, "key": key_features}
    for name, tensor in tensors.items():
        built = features[name]
        if tensor is None or built is None:
            continue
        if tensor.shape[-1] is not None and tensor.shape[-1] != built:
            raise ValueError(
                f"The last axis of `{name}` passed to {layer.name} must be {built}, the "
                f"feature size its weights were built for. Received: {shapes}"
            )


def attention_mask_4d(mask):
    """A ``[B|1, T, S]`` (or ``[T, S]``) mask as ``[B|1, 1, T, S]``: one mask for every head."""
    mask = ops.cast(mask, "bool")
    while len(mask.shape) < 4:
        mask = ops.expand_dims(mask, axis=-3)
    return mask


def attend(layer, query, key, value, mask, *, rate, scale, training, is_causal, sliding_window):
    """The attention layers' kernel call: ``kernels.dot_product_attention`` with
    the layer's implementation, and in training dropout at ``rate`` seeded from
    the layer's dropout seed generator (a new seed per call)."""
    rate = rate if training else 0.0
    seed = layer._dropout_layer.seed_generator.next() if rate > 0.0 else None
    return kernels.dot_product_attention(
        query,
        key,
        value,
        mask=mask,
        scale=scale,
        is_causal=bool(is_causal),
        sliding_window=sliding_window,
        dropout_rate=rate,
        seed=seed,
        implementation=layer.implementation,
    )


@register
class GroupQueryAttention(
    ImplementationArgument, einsum_dense.Int8Projections, keras.layers.GroupQueryAttention
):
    """Grouped-query attention with memory linear in the sequence length.

    A subclass of ``keras.layers.GroupQueryAttention`` (Keras 3.15): the constructor
    arguments (``head_dim``, ``num_query_heads``, ``num_key_value_heads``,
    ``dropout``, ``use_bias``, ``sliding_window``, ``use_gate``, ``seed``, ...), the
    call signature and masks, the sublayers, weights and their order are Keras's own,
    so ``ours.set_weights(keras_layer.get_weights())`` reproduces Keras's outputs. Only
    the attention differs: ``kernels.dot_product_attention`` takes the ``K`` key/value
    heads as they are (Keras repeats them ``N / K`` times first), never holds the
    ``[B, N, T, S]`` scores, skips causal blocks above the diagonal, and takes
    ``sliding_window`` as a window, walking only the key blocks inside the band
    (Keras builds a ``[T, S]`` band mask), so its work grows with ``T·w``.

    Keras's own computation runs when the scores are requested
    (``return_attention_scores=True``: they are the ``[B, N, T, S]`` tensor), and in
    a subclass that overrides ``_compute_attention``, which Keras's computation calls.

    A query position whose keys are all masked attends to nothing: its attention
    output is zero, where Keras averages every value. Dropout draws a different
    pattern from Keras's (a stateless hash of the positions seeded from the layer's
    seed generator): in training the outputs agree in distribution, not value by value.

    Args:
        *args: the positional arguments of ``keras.layers.GroupQueryAttention``
            (``head_dim``, ``num_query_heads``, ``num_key_value_heads``, ...).
        implementation: None (auto), ``"reference"``, ``"graph"``, ``"xla"`` or
            ``"native"``: the implementation of the attention kernel. Kept in
            ``get_config()``.
        **kwargs: the keyword arguments of ``keras.layers.GroupQueryAttention``.

    Example:

    >>> layer = GroupQueryAttention(head_dim=16, num_query_heads=8, num_key_value_heads=2,
    ...                             sliding_window=4)
    >>> x = keras.ops.ones((3, 10, 32))
    >>> layer(x, x, use_causal_mask=True).shape
    TensorShape([3, 10, 32])
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
        check_attention_call(
            self, query, value, key,
            query_features=self._query_dense.kernel.shape[0],
            value_features=self._value_dense.kernel.shape[0],
            key_features=self._key_dense.kernel.shape[0],
        )
        # A subclass that overrides `_compute_attention` expects Keras's computation to
        # call it (with the causal mask built): that hook is Keras's, not the kernel's.
        overridden = (
            type(self)._compute_attention is not keras.layers.GroupQueryAttention._compute_attention
        )
        if return_attention_scores or overridden:
            return super().call(
                query, value, key=key, query_mask=query_mask, value_mask=value_mask,
                key_mask=key_mask, attention_mask=attention_mask,
                return_attention_scores=return_attention_scores, training=training,
                use_causal_mask=use_causal_mask,
            )
        self._return_attention_scores = False
        if key is None:
            key = value
        mask = self._padding_mask(query_mask, value_mask, key_mask, attention_mask)
        if self.use_gate:
            gate = self._gate_dense(query)
        query = self._query_dense(query)  # [B, T, N, H]
        key = self._key_dense(key)  # [B, S, K, H]
        value = self._value_dense(value)  # [B, S, K, H]
        output = attend(
            self, query, key, value, mask, rate=self.dropout, scale=self._inverse_sqrt_head_dim,
            training=training, is_causal=use_causal_mask, sliding_window=self.sliding_window,
        )
        if self.use_gate:
            output = ops.multiply(output, gate)
        return self._output_dense(output)

    def _padding_mask(self, query_mask, value_mask, key_mask, attention_mask):
        """Keras's merged mask without the causal and window parts (the kernel takes
        those as arguments), as ``[B|1, 1, T, S]``, or None."""
        merged = None
        for mask, axis in ((query_mask, -1), (value_mask, -2), (key_mask, -2)):
            if mask is not None:
                mask = ops.expand_dims(ops.cast(mask, "bool"), axis)
                merged = mask if merged is None else ops.logical_and(merged, mask)
        if attention_mask is not None:
            attention_mask = ops.cast(attention_mask, "bool")
            merged = attention_mask if merged is None else ops.logical_and(attention_mask, merged)
        return None if merged is None else attention_mask_4d(merged)


GroupedQueryAttention = GroupQueryAttention
