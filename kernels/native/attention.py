"""The native attention forward (``attention.cc``) behind the compiled path's signature.

Shape letters as in ``fastlayers.kernels.attention``: ``query [B, T, N, H]``,
``key [B, S, K, H]``, ``value [B, S, K, D]``, rank-4 ``bias``/``mask`` broadcasting
to ``[B, N, T, S]``.

The forward op computes the output in one blockwise pass and returns the per-row
logsumexp beside it; the backward op recomputes each block's probabilities from
that logsumexp and returns dq, dk, dv and the bias gradient (``attention.cc``), so
training through it never holds a ``[T, S]`` tensor either. It has no second-order
gradient: differentiating its gradient raises, naming the paths that have one.

Dispatch runs it as ``NATIVE`` (``Kernel(native=...)``): its tiles come in the
call's ``Selection`` (a ``BlockSizes`` variant; the backward takes
``kernels.attention.NATIVE_BACKWARD_BLOCK_SIZES``); dispatch refuses it inside an
XLA cluster and asks ``not_built_reason`` whether the op builds.
"""

from __future__ import annotations

import tensorflow as tf
from fastlayers.kernels.native import build as build_lib

DTYPES = (tf.float32, tf.float16, tf.bfloat16)


@tf.autograph.experimental.do_not_convert
def load_library():
    """The op library, built on first use (``build.load_once``). Raises
    ``build.BuildError``; a failure is remembered for the process."""
    return build_lib.load_once()


@tf.autograph.experimental.do_not_convert
def build_status() -> tuple[bool, str]:
    """``(available, detail)``: whether the native op loads in this process, and
    its best ISA (``"amx"``, ``"avx512bf16"``, ``"avx512"``, ``"avx2"`` or
    ``"portable"``) or why it does not."""
    try:
        library = load_library()
    except build_lib.BuildError as error:
        return False, str(error)
    with tf.init_scope():
        return True, library.fastlayers_native_isa().numpy().decode()


@tf.autograph.experimental.do_not_convert
def not_supported_reasons(*, platform, dtype):
    """Why the native op cannot take a call for its platform and dtype; empty when it
    can. Whether it builds is ``not_built_reason``'s, asked after this."""
    reasons = []
    if platform == "gpu":
        reasons.append("the native kernel runs on CPU only")
    if tf.as_dtype(dtype) not in DTYPES:
        reasons.append(
            f"the native kernel takes float32, float16 or bfloat16, not {tf.as_dtype(dtype).name}"
        )
    return reasons


@tf.autograph.experimental.do_not_convert
def not_built_reason() -> str | None:
    """Why the op cannot run in this process, or None once it is loaded; the first
    call builds it, and a failure warns once (``build.not_built_reason``)."""
    return build_lib.not_built_reason("the native attention kernel")


class NativeAttention:
    """The ``"native"`` implementation of ``dot_product_attention`` as dispatch runs
    it: ``dot_product_attention_native`` with the tiles of the call's ``Selection``.

    Attributes:
        auto_while_training: True: the op's gradient is the native backward, so the
            auto table takes it while a gradient tape records too.
    """

    auto_while_training = True

    def __call__(self, query, key, value, bias=None, mask=None, *, selection, sliding_window=None, **options):
        # A window is one of the kernel's not_supported_reasons for this op: never here.
        del sliding_window
        return dot_product_attention_native(
            query, key, value, bias, mask, block_sizes=selection.variant, **options
        )

    def not_built_reason(self) -> str | None:
        """See the module's ``not_built_reason``."""
        return not_built_reason()


NATIVE = NativeAttention()


def dot_product_attention_native(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale,
    is_causal=False,
    dropout_rate=0.0,
    seed=None,
    block_sizes=None,
):
    """The native forward, with the semantics of ``dot_product_attention_compiled``
    (``bias`` and ``mask`` rank 4).

    ``block_sizes`` (a ``BlockSizes``) sets the forward's tiles (key blocks round up
    to 16 columns); None takes ``kernels.attention.NATIVE_BLOCK_SIZES``. The gradient
    is the native backward, with ``NATIVE_BACKWARD_BLOCK_SIZES``: the gradients of
    ``query``, ``key``, ``value`` and ``bias`` (summed over the bias's broadcast axes,
    in the bias's dtype).
    """
    library = load_library()
    from fastlayers.kernels import attention as attention_lib

    options = dict(
        scale=float(scale),
        is_causal=bool(is_causal),
        dropout_rate=float(dropout_rate),
        has_bias=bias is not None,
        has_mask=mask is not None,
    )
    if dropout_rate > 0.0:
        options["dropout_scale"] = float(1.0 / (1.0 - dropout_rate))
        seed_words = tf.stack(attention_lib._seed_words(seed))
    else:
        seed_words = tf.zeros([0], tf.uint32)
    block_sizes = block_sizes or attention_lib.NATIVE_BLOCK_SIZES
    options.update(block_q=block_sizes.block_q, block_k=block_sizes.block_k)
    mask_in = tf.zeros([0, 0, 0, 0], tf.bool) if mask is None else mask

    def forward(q, k, v, b):
        return library.fastlayers_attention_forward(q, k, v, b, mask_in, seed_words, **options)

    backward_blocks = attention_lib.NATIVE_BACKWARD_BLOCK_SIZES
    backward_options = dict(options, block_q=backward_blocks.block_q, block_k=backward_blocks.block_k)

    def backward(q, k, v, b, out, lse, d_out):
        return library.fastlayers_attention_backward(
            q, k, v, b, mask_in, seed_words, out, lse, d_out, **backward_options
        )

    no_bias = tf.zeros([0, 0, 0, 0], tf.float32)

    if bias is None:

        @tf.custom_gradient
        def attend(q, k, v):
            out, lse = forward(q, k, v, no_bias)

            def grad(d_out):
                d_q, d_k, d_v, _ = backward(q, k, v, no_bias, out, lse, d_out)
                return d_q, d_k, d_v

            return out, grad

        return attend(query, key, value)

    @tf.custom_gradient
    def attend_with_bias(q, k, v, b):
        b32 = tf.cast(b, tf.float32)
        out, lse = forward(q, k, v, b32)

        def grad(d_out):
            d_q, d_k, d_v, d_b = backward(q, k, v, b32, out, lse, d_out)
            return d_q, d_k, d_v, tf.cast(d_b, b.dtype)

        return out, grad

    return attend_with_bias(query, key, value, bias)


@tf.RegisterGradient("FastlayersAttentionBackward")
def _second_order(op, *grads):
    """The native backward has no gradient of its own: say so, and what does."""
    del op, grads
    raise NotImplementedError(
        "implementation='native' of dot_product_attention has no second-order gradient "
        "(the gradient of its gradient). Pass implementation='graph' or 'reference' to "
        "differentiate the attention twice."
    )
