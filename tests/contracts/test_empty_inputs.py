"""Zero-sized axes in every kernel and layer (issue 15): T=0 gives no rows, S=0 rows that
see no key (zeros), B=0 an empty batch; eagerly, in a tf.function with static shapes,
and in one traced with unknown sizes then called with zero; gradients too."""

import dataclasses
from collections.abc import Callable

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import IMPLEMENTATIONS
from layer_cases import LAYER_CASES

from fastlayers import kernels, layers
from fastlayers.kernels import tolerance


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """``run(*tensors, implementation=)`` on float32 inputs of ``shapes``; ``free`` marks
    the axes a shape-generic trace leaves unknown (the zero-sized ones among them)."""

    name: str
    run: Callable
    shapes: tuple
    free: tuple

    def __str__(self):
        return self.name


def _attention(**options):
    return lambda q, k, v, implementation: kernels.dot_product_attention(
        q, k, v, implementation=implementation, **options
    )


def _attention_masked(q, k, v, implementation):
    mask = tf.sequence_mask(tf.fill([tf.shape(k)[0]], tf.shape(k)[1] - 1), tf.shape(k)[1])
    return kernels.dot_product_attention(
        q, k, v, mask=mask[:, None, None, :], implementation=implementation
    )


def _dense(x, w, b, implementation):
    return kernels.dense(x, w, b, activation=tf.nn.relu, implementation=implementation)


def _pool(x, implementation):
    return kernels.max_pool2d(x, 2, padding="same", implementation=implementation)


def _attention_pooling(x, w, b, implementation):
    return kernels.attention_pooling(x, w, b, implementation=implementation)


def _fixed_mask(x, implementation):
    return kernels.fixed_mask(x, tf.constant([[1.0, 0.0, 2.0]] * 4), implementation=implementation)


def _center_zero(x, implementation):
    return kernels.center_zero(x, (2, 2), implementation=implementation)


def _exponential(x, implementation):
    return kernels.exponential(x, implementation=implementation)


def _residual(a, b, w, implementation):
    return kernels.residual_projection(a, b, w, implementation=implementation)


QKV = ((0, 1), (0, 1), (0, 1))  # B and the sequence axes free
KERNEL_CASES = [
    KernelCase("attention T=0", _attention(), ((2, 0, 4, 8), (2, 5, 2, 8), (2, 5, 2, 8)), QKV),
    KernelCase("attention S=0", _attention(), ((2, 3, 4, 8), (2, 0, 2, 8), (2, 0, 2, 6)), QKV),
    KernelCase("attention S=0 causal", _attention(is_causal=True),
               ((2, 3, 4, 8), (2, 0, 2, 8), (2, 0, 2, 8)), QKV),
    KernelCase("attention T=S=0 causal", _attention(is_causal=True),
               ((2, 0, 4, 8), (2, 0, 2, 8), (2, 0, 2, 8)), QKV),
    KernelCase("attention S=0 masked", _attention_masked,
               ((2, 3, 4, 8), (2, 0, 2, 8), (2, 0, 2, 8)), QKV),
    KernelCase("attention B=0", _attention(is_causal=True),
               ((0, 3, 4, 8), (0, 5, 2, 8), (0, 5, 2, 8)), QKV),
    KernelCase("attention B=0 dropout", _attention(dropout_rate=0.5, seed=3),
               ((0, 3, 4, 8), (0, 5, 2, 8), (0, 5, 2, 8)), QKV),
    KernelCase("attention H=0 scaled", _attention(scale=0.5),
               ((2, 3, 4, 0), (2, 5, 2, 0), (2, 5, 2, 8)), QKV),
    KernelCase("dense B=0", _dense, ((0, 7, 5), (5, 3), (3,)), ((0, 1), (), ())),
    KernelCase("dense T=0", _dense, ((2, 0, 5), (5, 3), (3,)), ((0, 1), (), ())),
    KernelCase("dense K=0", _dense, ((2, 0), (0, 3), (3,)), ((0,), (), ())),
    KernelCase("max_pool2d B=0", _pool, ((0, 5, 4, 3),), ((0, 1, 2),)),
    KernelCase("max_pool2d C=0", _pool, ((2, 5, 4, 0),), ((0, 1, 2),)),
    KernelCase("attention_pooling B=0", _attention_pooling, ((0, 7, 5), (5, 1), (1,)), ((0, 1), (), ())),
    KernelCase("attention_pooling T=0", _attention_pooling, ((2, 0, 5), (5, 1), (1,)), ((0, 1), (), ())),
    KernelCase("attention_pooling B=T=F=0", _attention_pooling, ((0, 0, 0), (0, 1), (1,)), ((0, 1), (), ())),
    KernelCase("max_pool2d C=0 valid", lambda x, implementation: kernels.max_pool2d(x, 1, implementation=implementation),
               ((0, 1, 1, 0),), ((0, 1, 2),)),
    KernelCase("fixed_mask B=0", _fixed_mask, ((0, 4, 3),), ((0,),)),
    KernelCase("center_zero B=0", _center_zero, ((0, 6, 6),), ((0,),)),
    KernelCase("exponential B=0", _exponential, ((0, 5),), ((0, 1),)),
    KernelCase("residual_projection B=0", _residual, ((0, 6), (0, 4), (6, 4)), ((0,), (0,), ())),
]


def _inputs(case, rng):
    return [tf.constant(rng.standard_normal(shape), tf.float32) for shape in case.shapes]


def _loss(outputs):
    flat = tf.nest.flatten(outputs)
    return sum(tf.reduce_sum(tf.square(y) + y) for y in flat)


def _with_gradients(case, implementation, tensors):
    with tf.GradientTape() as tape:
        tape.watch(tensors)
        outputs = case.run(*tensors, implementation=implementation)
        loss = _loss(outputs)
    grads = tape.gradient(loss, tensors, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return outputs, grads


def _check_same(actual, expected):
    for a, e in zip(tf.nest.flatten(actual), tf.nest.flatten(expected), strict=True):
        assert tuple(a.shape) == tuple(e.shape)
        tolerance("float32").check(np.asarray(a), np.asarray(e))


@pytest.fixture
def reference_of(rng):
    def reference(case):
        tensors = _inputs(case, rng)
        return tensors, _with_gradients(case, "reference", tensors)

    return reference


def _eager_sweep():
    """XLA compiles each case's forward and backward; beyond attention (and the
    property tests, which draw zero-sized axes for every kernel and implementation)
    its eager cases run under -m slow."""
    for case in KERNEL_CASES:
        for implementation in IMPLEMENTATIONS:
            slow = implementation == "xla" and not case.name.startswith("attention ")
            yield pytest.param(case, implementation, id=f"{implementation}-{case}",
                               marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("case, implementation", list(_eager_sweep()))
def test_kernel_eagerly(case, implementation, reference_of):
    tensors, expected = reference_of(case)
    _check_same(_with_gradients(case, implementation, tensors), expected)


def _traced_sweep():
    """Each traced case compiles forward and backward twice; the attention cases the
    issue reported (T=0, S=0, B=0 under graph, XLA and auto) run by default, the rest
    of the sweep under -m slow."""
    quick = {"attention T=0", "attention S=0", "attention B=0", "dense K=0", "max_pool2d C=0 valid",
             "attention_pooling B=T=F=0"}
    for case in KERNEL_CASES:
        for implementation in IMPLEMENTATIONS:
            fast = case.name in quick and implementation != "reference"
            yield pytest.param(case, implementation, id=f"{implementation}-{case}",
                               marks=[] if fast else [pytest.mark.slow])


@pytest.mark.parametrize("case, implementation", list(_traced_sweep()))
def test_kernel_traced_with_static_then_unknown_sizes(case, implementation, reference_of):
    tensors, expected = reference_of(case)
    traced = tf.function(lambda *t: _with_gradients(case, implementation, list(t)))
    _check_same(traced(*tensors), expected)
    signature = [
        tf.TensorSpec([None if axis in free else size for axis, size in enumerate(shape)], tf.float32)
        for shape, free in zip(case.shapes, case.free, strict=True)
    ]
    generic = tf.function(lambda *t: _with_gradients(case, implementation, list(t)), input_signature=signature)
    _check_same(generic(*tensors), expected)


def test_attention_empty_values():
    """S=0: every query row sees no key, so its output is zeros, not NaN."""
    q = tf.ones([2, 3, 4, 8])
    k = v = tf.ones([2, 0, 2, 8])
    for implementation in IMPLEMENTATIONS:
        out = kernels.dot_product_attention(q, k, v, implementation=implementation)
        np.testing.assert_array_equal(out.numpy(), np.zeros([2, 3, 4, 8], np.float32))


def test_attention_zero_head_dim_needs_a_scale():
    with pytest.raises(ValueError, match=r"head dim H .* is 0.*pass `scale`.*query.shape=\(2, 3, 4, 0\)"):
        kernels.dot_product_attention(tf.ones([2, 3, 4, 0]), tf.ones([2, 5, 2, 0]), tf.ones([2, 5, 2, 8]))


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("data_format, shape, axis", [
    ("channels_last", (1, 0, 4, 3), "height axis \\(axis 1"),
    ("channels_last", (1, 4, 0, 3), "width axis \\(axis 2"),
    ("channels_first", (1, 3, 4, 0), "width axis \\(axis 3"),
])
def test_pooling_an_empty_image_names_the_axis(padding, data_format, shape, axis):
    with pytest.raises(ValueError, match=axis + r".*is empty.*Received: inputs.shape=" + re_shape(shape)):
        kernels.max_pool2d(tf.ones(shape), 2, padding=padding, data_format=data_format)
    with pytest.raises(ValueError, match=axis):
        layers.MaxPooling2D(2, padding=padding, data_format=data_format)(tf.ones(shape))


def re_shape(shape):
    return "\\" + str(tuple(shape))[:-1] + "\\)"


def test_centring_a_window_in_an_empty_axis_names_the_axis():
    with pytest.raises(ValueError, match=r"Axis -2 of the input is empty.*inputs.shape=\(1, 0, 4\)"):
        kernels.center_zero(tf.ones([1, 0, 4]), (2, 2))
    with pytest.raises(ValueError, match=r"Axis -1 of the input is empty"):
        layers.CenterZero((1, 1))(tf.ones([1, 4, 0]))


# ---------------------------------------------------------------------------------
# Layers: against Keras's layer (same weights) where Keras has it, else the reference.


def _keras_twin(theirs, ours, *inputs):
    theirs(*inputs)
    ours(*inputs)
    ours.set_weights(theirs.get_weights())
    return theirs


KERAS_TWINS = [
    ("Dense B=0", lambda **kw: layers.Dense(4, activation="relu", **kw),
     lambda: keras.layers.Dense(4, activation="relu"), [(0, 7, 5)]),
    ("Dense T=0", lambda **kw: layers.Dense(4, **kw), lambda: keras.layers.Dense(4), [(2, 0, 5)]),
    ("MaxPooling2D B=0", lambda **kw: layers.MaxPooling2D(2, **kw),
     lambda: keras.layers.MaxPooling2D(2), [(0, 6, 4, 3)]),
    ("MultiHeadAttention T=0", lambda **kw: layers.MultiHeadAttention(2, 4, **kw),
     lambda: keras.layers.MultiHeadAttention(2, 4), [(2, 0, 8), (2, 5, 8)]),
    ("MultiHeadAttention S=0", lambda **kw: layers.MultiHeadAttention(2, 4, **kw),
     lambda: keras.layers.MultiHeadAttention(2, 4), [(2, 3, 8), (2, 0, 8)]),
    ("MultiHeadAttention B=0", lambda **kw: layers.MultiHeadAttention(2, 4, **kw),
     lambda: keras.layers.MultiHeadAttention(2, 4), [(0, 3, 8), (0, 5, 8)]),
]


# Each compiled implementation compiles a layer's forward and backward twice (static
# and shape-generic): auto and the reference run by default, the rest under -m slow.
LAYER_IMPLEMENTATIONS = [
    pytest.param(i, marks=pytest.mark.slow) if i in ("graph", "xla") else i for i in IMPLEMENTATIONS
]


@pytest.mark.parametrize("name, make, make_keras, shapes", KERAS_TWINS, ids=[t[0] for t in KERAS_TWINS])
@pytest.mark.parametrize("implementation", LAYER_IMPLEMENTATIONS)
def test_layer_matches_keras_on_empty_inputs(name, make, make_keras, shapes, implementation, rng):
    inputs = [tf.constant(rng.standard_normal(shape), tf.float32) for shape in shapes]
    # Keras builds from the first call's shapes: build both on non-empty ones first.
    build = [tf.ones([max(1, d) for d in shape]) for shape in shapes]
    ours = make(implementation=implementation)
    theirs = _keras_twin(make_keras(), ours, *build)
    expected = theirs(*inputs)
    _check_same(ours(*inputs), expected)
    generic = tf.function(
        ours, input_signature=[tf.TensorSpec([None] * (len(s) - 1) + [s[-1]]) for s in shapes]
    )
    _check_same(generic(*inputs), expected)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        loss = _loss(ours(*inputs))
    grads = tape.gradient(loss, inputs + ours.trainable_weights,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    for grad, x in zip(grads, inputs + ours.trainable_weights, strict=True):
        assert tuple(grad.shape) == tuple(x.shape)
        assert np.all(np.isfinite(grad.numpy()))


@pytest.mark.parametrize("case", LAYER_CASES, ids=str)
def test_every_layer_takes_an_empty_batch(case, rng):
    """B=0 through every public layer: the auto path gives the reference's empty output
    and gradients, eagerly and in a trace with an unknown batch size."""
    full = case.inputs(rng)
    empty = tf.nest.map_structure(lambda x: tf.constant(x[:0], tf.float32), full)
    reference, auto = case.make(implementation="reference"), case.make()
    case.apply(reference, full)
    case.apply(auto, full)
    auto.set_weights(reference.get_weights())
    expected = case.apply(reference, empty)
    _check_same(case.apply(auto, empty), expected)
    signature = tf.nest.map_structure(lambda x: tf.TensorSpec((None,) + x.shape[1:]), empty)
    generic = tf.function(lambda *x: case.apply(auto, x if case.positional else x[0]),
                          input_signature=signature if case.positional else [signature])
    _check_same(generic(*empty) if case.positional else generic(empty), expected)
    with tf.GradientTape() as tape:
        tape.watch(tf.nest.flatten(empty))
        loss = _loss(case.apply(auto, empty))
    sources = tf.nest.flatten(empty) + auto.trainable_weights
    for grad, x in zip(tape.gradient(loss, sources, unconnected_gradients="zero"), sources, strict=True):
        assert tuple(grad.shape) == tuple(x.shape)
        np.testing.assert_array_equal(grad.numpy(), np.zeros(x.shape))
