"""LayerNormalization and RMSNormalization against numpy and Keras's layers: every axis
form, epsilon, center/scale off, every policy, gradients, files, bad and empty inputs."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import COMPILED, IMPLEMENTATIONS, round_to
from oracles import layer_norm_oracle, normalized_axes, rms_norm_oracle

from fastlayers import kernels, layers, testing
from fastlayers.kernels import normalization
from fastlayers.kernels.precision import tolerance

# The native op normalizes trailing axes: every implementation runs those.
WITH_NATIVE = IMPLEMENTATIONS + ("native",)


def _implementations(axis, rank):
    trailing = normalized_axes(axis, rank) == tuple(range(rank - len(normalized_axes(axis, rank)), rank))
    return WITH_NATIVE if trailing else IMPLEMENTATIONS


# Every axis form on a [B, T, D] (or [B, H, W, C]) input: the last axis, a middle
# one, trailing axes, axes that are not neighbours, and negative indices.
AXES = [
    (-1, (3, 5, 8)),
    (1, (3, 5, 8)),
    ([1, 2], (3, 5, 8)),
    ([-3, -1], (2, 3, 4, 5)),
    ((1, 3), (2, 3, 4, 5)),
]


def _layer_norm(axis, epsilon=1e-3, **options):
    def make(**kwargs):
        return layers.LayerNormalization(
            axis=axis, epsilon=epsilon, gamma_initializer="random_normal",
            beta_initializer="random_normal", **options, **kwargs,
        )

    def oracle(x, weights):
        weights = list(weights)
        scaled = options.get("scale", True) or options.get("rms_scaling", False)
        centered = options.get("center", True) and not options.get("rms_scaling", False)
        gamma = weights.pop(0) if scaled else None
        beta = weights.pop(0) if centered else None
        return layer_norm_oracle(x, gamma, beta, axis, epsilon, options.get("rms_scaling", False))

    return make, oracle


def _rms_norm(axis, shape, epsilon=1e-6):
    def make(**kwargs):
        layer = layers.RMSNormalization(axis=axis, epsilon=epsilon, **kwargs)
        # Keras's scale starts at ones and takes no initializer: give it values.
        layer.build(shape)
        layer.scale.assign(np.random.default_rng(1).uniform(0.5, 2.0, layer.scale.shape))
        return layer

    return make, lambda x, weights: rms_norm_oracle(x, weights[0], axis, epsilon)


@pytest.mark.parametrize("axis,shape", AXES, ids=str)
def test_layer_normalization_matches_numpy_in_every_policy_and_implementation(axis, shape, rng):
    make, oracle = _layer_norm(axis)
    testing.assert_layer_matches(make, oracle, rng.standard_normal(shape) * 3 + 1,
                                 implementations=_implementations(axis, len(shape)))


@pytest.mark.parametrize("axis,shape", AXES, ids=str)
def test_rms_normalization_matches_numpy_in_every_policy_and_implementation(axis, shape, rng):
    make, oracle = _rms_norm(axis, shape)
    testing.assert_layer_matches(make, oracle, rng.standard_normal(shape) * 3 + 1,
                                 implementations=_implementations(axis, len(shape)))


@pytest.mark.parametrize(
    "options",
    [{"center": False}, {"scale": False}, {"center": False, "scale": False}, {"rms_scaling": True}],
    ids=str,
)
def test_center_and_scale_off_and_rms_scaling(options, rng):
    make, oracle = _layer_norm([1, 2], **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Keras deprecates rms_scaling
        layer = make()
        layer.build((3, 5, 8))
        expected_weights = ["gamma"] * (options.get("scale", True) or "rms_scaling" in options) + [
            "beta"
        ] * (options.get("center", True) and "rms_scaling" not in options)
        assert [w.name for w in layer.weights] == expected_weights
        testing.assert_layer_matches(make, oracle, rng.standard_normal((3, 5, 8)),
                                     policies=("float32", "mixed_bfloat16"),
                                     implementations=WITH_NATIVE)


@pytest.mark.parametrize("epsilon", [0.0, 0.5, 10.0])
def test_epsilon_enters_the_denominator(epsilon, rng):
    # A small spread makes epsilon dominate the variance, so a wrong epsilon shows.
    x = rng.standard_normal((4, 16)) * 0.3
    make, oracle = _layer_norm(-1, epsilon=epsilon)
    testing.assert_layer_matches(make, oracle, x, policies=("float32", "mixed_float16"),
                                 implementations=WITH_NATIVE)
    make, oracle = _rms_norm(-1, x.shape, epsilon=epsilon)
    testing.assert_layer_matches(make, oracle, x, policies=("float32", "mixed_float16"),
                                 implementations=WITH_NATIVE)


@pytest.mark.parametrize("axis,shape", AXES[:3] + AXES[4:], ids=str)
@pytest.mark.parametrize("policy_name", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_weights_copied_from_kerass_layers_give_kerass_outputs(axis, shape, policy_name, rng):
    x = (rng.standard_normal(shape) * 2 + 0.5).astype("float32")
    with testing.dtype_policy(policy_name):
        pairs = [(keras.layers.LayerNormalization(axis=axis, epsilon=1e-2),
                  layers.LayerNormalization(axis=axis, epsilon=1e-2))]
        if axis in (-1, [1, 2]):  # Keras's RMSNormalization broadcasts trailing axes only
            pairs.append((keras.layers.RMSNormalization(axis=axis), layers.RMSNormalization(axis=axis)))
        for theirs, ours in pairs:
            theirs.build(shape)
            ours.build(shape)
            theirs.set_weights([rng.uniform(0.5, 2, w.shape) for w in theirs.get_weights()])
            ours.set_weights(theirs.get_weights())
            assert [w.path.split("/")[-1] for w in ours.weights] == [
                w.path.split("/")[-1] for w in theirs.weights
            ]
            expected, actual = theirs(x), ours(x)
            assert actual.dtype == expected.dtype
            tolerance(actual.dtype).check(actual, expected, what=type(ours).__name__)
            assert ours.get_config() == {**theirs.get_config(), "implementation": None,
                                         "name": ours.name}


@pytest.mark.parametrize("policy_name", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("implementation", WITH_NATIVE)
def test_statistics_are_float32_under_mixed_policies(policy_name, implementation):
    # Squares of 300 overflow float16 (max 65504): float16 statistics give inf/0.
    x = np.linspace(-300, 300, 64).reshape(2, 32) + 1000
    with testing.dtype_policy(policy_name):
        for layer, oracle in [
            (layers.LayerNormalization(implementation=implementation),
             lambda x: layer_norm_oracle(x, None, None, -1, 1e-3)),
            (layers.RMSNormalization(implementation=implementation),
             lambda x: rms_norm_oracle(x, None, -1, 1e-6)),
        ]:
            # In the compute dtype: Keras's normalization layers do not cast inputs.
            y = layer(tf.constant(x, layer.compute_dtype))
            assert np.isfinite(np.asarray(tf.cast(y, tf.float32))).all()
            expected = oracle(round_to(x, layer.compute_dtype))
            tolerance(layer.compute_dtype).check(tf.cast(y, tf.float64), expected)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_variance_does_not_cancel_when_the_mean_is_large(implementation, rng):
    # mean(x²) - mean² loses every digit here in float32 (x² ~ 1e8, whose float32
    # spacing is 8, against a variance of 1); two passes lose only the mean's
    # rounding, a few spacings of 1e4 (about 1e-3 each) against a spread of 1.
    x = 1e4 + rng.standard_normal((4, 256))
    y = kernels.layer_normalization(tf.constant(x, tf.float32), implementation=implementation)
    expected = layer_norm_oracle(round_to(x, "float32"), None, None, -1, 1e-3)
    np.testing.assert_allclose(y, expected, rtol=0, atol=16 * np.spacing(np.float32(1e4)))


@pytest.mark.parametrize("axis,shape", AXES, ids=str)
def test_kernels_match_numpy_in_every_dtype(axis, shape, rng):
    x = rng.standard_normal(shape) * 2 - 1
    axes = normalized_axes(axis, len(shape))
    gamma = rng.uniform(0.5, 2, [shape[a] for a in axes])
    beta = rng.standard_normal([shape[a] for a in axes])
    testing.assert_kernel_matches(
        lambda x, implementation: kernels.layer_normalization(
            x, gamma, beta, axis=axis, epsilon=1e-3, implementation=implementation),
        lambda x: layer_norm_oracle(x, gamma, beta, axis, 1e-3), x)
    testing.assert_kernel_matches(
        lambda x, implementation: kernels.rms_normalization(
            x, gamma, axis=axis, epsilon=1e-6, implementation=implementation),
        lambda x: rms_norm_oracle(x, gamma, axis, 1e-6), x)


def test_full_rank_weights_broadcast(rng):
    x = rng.standard_normal((2, 3, 4))
    gamma = rng.standard_normal((1, 3, 4))
    for implementation in IMPLEMENTATIONS:
        y = kernels.layer_normalization(tf.constant(x), tf.constant(gamma), axis=[1, 2],
                                        implementation=implementation)
        tolerance("float64").check(y, layer_norm_oracle(x, gamma[0], None, [1, 2], 1e-3))


@pytest.mark.parametrize(
    "axis,shape", [AXES[0], pytest.param(*AXES[3], marks=pytest.mark.slow)], ids=str
)
def test_kernel_gradients_match_the_reference(axis, shape, rng):
    x = rng.standard_normal(shape)
    axes = normalized_axes(axis, len(shape))
    weight = rng.uniform(0.5, 2, [shape[a] for a in axes])
    testing.assert_kernel_gradients_match_reference(
        lambda x, g, b, implementation: kernels.layer_normalization(
            x, g, b, axis=axis, implementation=implementation), x, weight, weight - 1)
    testing.assert_kernel_gradients_match_reference(
        lambda x, g, implementation: kernels.rms_normalization(
            x, g, axis=axis, implementation=implementation), x, weight)


def test_layer_gradients_match_the_reference_in_every_policy(rng):
    x = rng.standard_normal((3, 5, 8))
    testing.assert_gradients_match_reference(_layer_norm([1, 2])[0], x,
                                             implementations=COMPILED + ("native",))
    testing.assert_gradients_match_reference(
        lambda **kw: layers.RMSNormalization(axis=-1, **kw), x,
        implementations=COMPILED + ("native",))


def test_layer_gradients_match_numpy(rng):
    # d/dx of sum(w·y) for y = LayerNorm(x) over the last axis, by central differences.
    x = rng.standard_normal((2, 6))
    w = rng.standard_normal((2, 6))
    layer = layers.LayerNormalization(epsilon=0.1, implementation="xla", dtype="float64")
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(layer(xt) * w)
    grad = tape.gradient(loss, xt).numpy()
    h, numeric = 1e-6, np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        f = lambda v: (layer_norm_oracle(v, None, None, -1, 0.1) * w).sum()  # noqa: E731
        numeric[index] = (f(x + step) - f(x - step)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-6)


# Issue 15: zero-sized batch and sequence axes give empty outputs, in every mode.
EMPTY = [(0, 5, 8), (3, 0, 8)]


def _norm_layers(implementation):
    return [layers.LayerNormalization(axis=-1, implementation=implementation),
            layers.LayerNormalization(axis=[1, 2], implementation=implementation),
            layers.RMSNormalization(implementation=implementation)]


@pytest.mark.parametrize("shape", EMPTY, ids=str)
@pytest.mark.parametrize("implementation", WITH_NATIVE)
def test_empty_batch_or_sequence_gives_an_empty_output(shape, implementation):
    x = np.zeros(shape, "float32")
    for layer in _norm_layers(implementation):
        reference = getattr(keras.layers, type(layer).__name__)(axis=layer.axis)
        assert layer(x).shape == reference(x).shape == shape
        assert tf.function(layer)(x).shape == shape
        x_t = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x_t)
            loss = tf.reduce_sum(layer(x_t))
        assert tape.gradient(loss, x_t).shape == shape


@pytest.mark.parametrize("implementation", WITH_NATIVE)
def test_traced_with_unknown_sizes_then_called_with_zero(implementation):
    layer = layers.LayerNormalization(implementation=implementation)
    rms = layers.RMSNormalization(implementation=implementation)
    for built in (layer, rms):  # variables created in a trace would cost a second trace
        built.build((None, None, 8))

    @tf.function(input_signature=[tf.TensorSpec([None, None, 8], tf.float32)])
    def run(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x) + rms(x)
            loss = tf.reduce_sum(y)
        return y, tape.gradient(loss, x)

    for shape in [(0, 4, 8), (2, 0, 8), (0, 0, 8), (2, 3, 8)]:
        y, grad = run(tf.zeros(shape))
        assert y.shape == grad.shape == shape
    assert run.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("implementation", COMPILED + ("native",))
def test_kernels_take_an_empty_normalized_axis(implementation):
    # Zero features: nothing to normalize, an empty output (the mean of nothing is NaN
    # but no element holds it), as Keras's ops give.
    x = tf.zeros((3, 0))
    for kernel in (kernels.layer_normalization, kernels.rms_normalization):
        assert kernel(x, implementation=implementation).shape == (3, 0)


def test_round_trip_with_several_axes(rng, tmp_path):
    x = rng.standard_normal((3, 5, 8))
    for layer in [layers.LayerNormalization(axis=[1, 2], center=False, implementation="xla"),
                  layers.RMSNormalization(axis=[-2, -1], epsilon=1e-4, implementation="graph"),
                  layers.LayerNormalization(axis=[1, 2], implementation="native")]:
        loaded = testing.assert_keras_round_trip(layer, x, tmp_path)
        restored = loaded.layers[-1]
        assert restored.axis == [1, 2] if isinstance(layer, layers.LayerNormalization) else True
        assert restored.implementation == layer.implementation


def test_implementation_runs_the_kernel_it_names(rng):
    x = rng.standard_normal((4, 8)).astype("float32")
    layer = layers.LayerNormalization(implementation="xla")
    layer(x)
    before = normalization.LAYER_NORMALIZATION._functions["xla"].experimental_get_tracing_count()
    layer(x + 1)
    after = normalization.LAYER_NORMALIZATION._functions["xla"].experimental_get_tracing_count()
    assert after == before >= 1


BAD = [
    ("implementation", lambda: layers.LayerNormalization(implementation="cuda"), ValueError,
     r"Received: implementation='cuda'"),
    ("rms implementation", lambda: layers.RMSNormalization(implementation="fast"), ValueError,
     r"Received: implementation='fast'"),
    ("epsilon negative", lambda: layers.LayerNormalization(epsilon=-1e-3), ValueError,
     r"invalid value for `epsilon`.*Received: epsilon=-0.001"),
    ("epsilon string", lambda: layers.RMSNormalization(epsilon="small"), ValueError,
     r"Received: epsilon='small'"),
    ("axis type", lambda: layers.LayerNormalization(axis="last"), TypeError,
     r"int or a list/tuple of ints.*'last'"),
    ("axis item", lambda: layers.LayerNormalization(axis=[1, "2"]), ValueError,
     r"invalid value for `axis`.*Received: axis=\[1, '2'\]"),
    ("axis empty", lambda: layers.RMSNormalization(axis=[]), ValueError, r"Received: axis=\[\]"),
    ("axis out of range", lambda: layers.LayerNormalization(axis=3)(np.ones((2, 4), "float32")),
     ValueError, r"axis 3 is out of bounds for an input of rank 2.*input_shape=\(2, 4\)"),
    ("rms axis out of range", lambda: layers.RMSNormalization(axis=-3)(np.ones((2, 4), "float32")),
     ValueError, r"axis -3 is out of bounds"),
    ("axis repeated", lambda: layers.LayerNormalization(axis=[1, -1])(np.ones((2, 4), "float32")),
     ValueError, r"distinct axes"),
    ("unknown normalized axis", lambda: layers.LayerNormalization(axis=1)(keras.Input((None, 4))),
     ValueError, r"normalized axes \[1\] to be known.*input_shape=\(None, None, 4\)"),
    ("feature size changed",
     lambda: [layer(np.ones((2, s), "float32")) for layer in [layers.LayerNormalization()]
              for s in (4, 3)],
     ValueError, r"`gamma` must have the sizes.*gamma.shape=\(4,\), x.shape=\(2, 3\)"),
    ("kernel int input", lambda: kernels.layer_normalization(tf.ones((2, 3), tf.int32)), TypeError,
     r"Received: x.dtype=int32"),
    ("kernel gamma shape", lambda: kernels.rms_normalization(tf.ones((2, 3)), tf.ones((2,))),
     ValueError, r"`scale` must have the sizes.*scale.shape=\(2,\)"),
    ("kernel beta dtype",
     lambda: kernels.layer_normalization(tf.ones((2, 3)), None, tf.ones((3,), tf.int32)),
     TypeError, r"`beta` must have a floating dtype. Received: beta.dtype=int32"),
    ("kernel implementation", lambda: kernels.rms_normalization(tf.ones((2, 3)), implementation="x"),
     ValueError, r"Received: implementation='x'"),
]


@pytest.mark.parametrize("thunk,error,pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise_errors_that_name_the_value(thunk, error, pattern):
    with pytest.raises(error, match=pattern):
        thunk()


def test_a_shape_generic_trace_compiles_inside_an_xla_train_step(rng):
    # Calls of several ranks relax the kernel's functions to an unknown rank; XLA
    # then still needs the weights' broadcast shape as a constant.
    for shape in [(2, 3), (2, 3, 4), (2, 3, 4, 5), (3, 4)]:
        for implementation in COMPILED:
            kernels.layer_normalization(tf.ones(shape), tf.ones(shape[-1:]), tf.ones(shape[-1:]),
                                        implementation=implementation)
            kernels.rms_normalization(tf.ones(shape), tf.ones(shape[-1:]),
                                      implementation=implementation)
    inputs = keras.Input((5, 4))
    y = layers.LayerNormalization(axis=[1, 2], implementation="xla")(inputs)
    y = layers.RMSNormalization(implementation="xla")(y)
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(y)))
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    history = model.fit(rng.standard_normal((16, 5, 4)), np.ones((16, 1)), batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
