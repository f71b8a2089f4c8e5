"""EinsumDense: Keras's layer, with its int8 form on the fused int8 Dense kernel where
the equation is a plain matmul; and the attention layers' projections taking it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from fastlayers import layers
from fastlayers.layers.einsum_dense import matmul_split


@pytest.mark.parametrize(
    "equation, split",
    [
        ("abc,cde->abde", ("ab", "c", "de")),
        ("abcd,cde->abe", ("ab", "cd", "e")),
        ("ab,bc->ac", ("a", "b", "c")),
        ("ab,bc -> ac", ("a", "b", "c")),
        ("...b,bc->...c", None),
        ("abc,cd->abdc", None),
        ("abc,dc->abd", None),
        ("abc,cde->aebd", None),
        ("ab,b->a", ("a", "b", "")),
        ("aab,bc->ac", None),
    ],
)
def test_matmul_split(equation, split):
    assert matmul_split(equation) == split


def _pair(equation, output_shape, bias_axes, input_shape, implementation=None, **kwargs):
    ours = layers.EinsumDense(equation, output_shape, bias_axes=bias_axes, implementation=implementation,
                              bias_initializer="random_normal", **kwargs)
    theirs = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes, **kwargs)
    ours.build(input_shape)
    theirs.build(input_shape)
    theirs.set_weights(ours.get_weights())
    ours.quantize("int8")
    theirs.quantize("int8")
    return ours, theirs


CASES = [
    ("abc,cde->abde", (None, 4, 8), "de", (2, 5, 16)),
    ("abcd,cde->abe", (None, 16), "e", (2, 5, 4, 8)),
    ("ab,bc->ac", (24,), "c", (3, 33)),
    ("abc,cde->abde", (None, 3, 5), "e", (2, 7, 9)),
    ("abc,cd->abd", (None, 6), None, (2, 4, 10)),
]


@pytest.mark.parametrize("implementation", [None, "native", "xla"])
@pytest.mark.parametrize("equation, output_shape, bias_axes, input_shape", CASES)
def test_int8_matches_kerass_int8_einsum_dense(rng, implementation, equation, output_shape, bias_axes, input_shape):
    ours, theirs = _pair(equation, output_shape, bias_axes, input_shape, implementation, activation="relu")
    x = rng.standard_normal((2,) + input_shape[1:]).astype(np.float32)
    assert ours.int8_not_supported_reasons(tf.constant(x)) == []
    expected = np.asarray(theirs(x))
    if implementation == "xla":  # XLA may reorder the epilogue's float32 steps
        np.testing.assert_allclose(np.asarray(ours(x)), expected, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(np.asarray(ours(x)), expected)
        np.testing.assert_array_equal(np.asarray(tf.function(ours)(x)), expected)


def test_the_fused_kernel_is_the_one_that_runs(rng):
    ours, _ = _pair("abc,cde->abde", (None, 4, 8), "de", (2, 5, 16), "native")
    graph = tf.function(ours).get_concrete_function(tf.TensorSpec((2, 5, 16), tf.float32)).graph
    assert [op.type for op in graph.get_operations() if op.type.startswith("Fastlayers")] == ["FastlayersDenseInt8"]


def test_an_equation_that_is_no_matmul_runs_kerass_computation(rng):
    ours, theirs = _pair("abc,cd->abdc", (None, 4, 6), None, (2, 3, 6))
    x = rng.standard_normal((2, 3, 6)).astype(np.float32)
    (reason,) = ours.int8_not_supported_reasons(tf.constant(x))
    assert reason.startswith("equation 'abc,cd->abdc' is not a plain matmul")
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(theirs(x)))
    explicit, _ = _pair("abc,cd->abdc", (None, 4, 6), None, (2, 3, 6), "native")
    with pytest.raises(ValueError, match=r"implementation='native' cannot run the int8 EinsumDense on this call: equation"):
        explicit(x)


def test_input_gradient_is_kerass(rng):
    ours, theirs = _pair("abc,cde->abde", (None, 4, 8), "de", (2, 5, 16))
    x = tf.constant(rng.standard_normal((2, 5, 16)), tf.float32)

    def gradient(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x) ** 2)
        return tape.gradient(loss, x)

    np.testing.assert_allclose(gradient(ours).numpy(), gradient(theirs).numpy(), rtol=1e-5, atol=1e-5)


def test_config_round_trip_and_bad_implementation():
    layer = layers.EinsumDense("ab,bc->ac", (4,), implementation="native")
    assert layers.EinsumDense.from_config(layer.get_config()).implementation == "native"
    with pytest.raises(ValueError, match=r"Received an invalid value for `implementation`.*Received: implementation='fast'"):
        layers.EinsumDense("ab,bc->ac", (4,), implementation="fast")


def test_subclasses_are_not_quantized_silently():
    class Custom(layers.EinsumDense):
        pass

    layer = Custom("ab,bc->ac", (3,))
    layer.build((None, 4))
    with pytest.raises(NotImplementedError, match="does not have a `quantize` method implemented"):
        layer.quantize("int8")


@pytest.mark.parametrize("layer_class", ["MultiHeadAttention", "GroupQueryAttention"])
def test_quantized_attention_projections_run_the_int8_kernel(rng, layer_class):
    if layer_class == "MultiHeadAttention":
        ours, theirs = layers.MultiHeadAttention(2, 8), keras.layers.MultiHeadAttention(2, 8)
    else:
        ours, theirs = layers.GroupQueryAttention(8, 4, 2), keras.layers.GroupQueryAttention(8, 4, 2)
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    ours(x, x)
    theirs(x, x)
    theirs.set_weights(ours.get_weights())
    projections = [ours._query_dense, ours._key_dense, ours._value_dense, ours._output_dense]
    assert all(type(p) is layers.EinsumDense for p in projections)
    inputs = keras.Input((6, 16))
    models = [keras.Model(inputs, layer(inputs, inputs)) for layer in (ours, theirs)]
    for model in models:
        model.quantize("int8")
    assert all(p.quantization_mode == "int8" and p.int8_not_supported_reasons(tf.constant(x)) == [] for p in projections[:3])
    graph = tf.function(ours).get_concrete_function(tf.TensorSpec((2, 6, 16), tf.float32), tf.TensorSpec((2, 6, 16), tf.float32)).graph
    assert len([op for op in graph.get_operations() if op.type == "FastlayersDenseInt8"]) == 4
    np.testing.assert_allclose(np.asarray(models[0](x)), np.asarray(models[1](x)), rtol=1e-5, atol=1e-5)


def test_quantized_attention_weights_save_and_load(rng, tmp_path):
    # A .keras file of an int8 attention layer does not load in Keras 3.15 (its
    # config rebuilds float projections), for Keras's layer as for ours; weights do.
    def quantized_model():
        inputs = keras.Input((6, 16))
        model = keras.Model(inputs, layers.MultiHeadAttention(2, 8)(inputs, inputs))
        model.quantize("int8")
        return model

    model = quantized_model()
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    expected = np.asarray(model(x))
    model.save_weights(tmp_path / "int8.weights.h5")
    restored = quantized_model()
    restored.load_weights(tmp_path / "int8.weights.h5")
    assert type(restored.layers[1]._query_dense) is layers.EinsumDense
    np.testing.assert_array_equal(np.asarray(restored(x)), expected)
