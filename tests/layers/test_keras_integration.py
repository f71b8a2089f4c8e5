"""Keras integration: model.fit under every jit_compile setting; shapes that vary."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import each_value, gpu_available
from layer_cases import LAYER_CASES

from fastlayers import layers
from fastlayers.kernels.dense import DENSE


# Every layer under one of False and True by default (each setting in turn; every
# layer's own tests train it under both); the product with -m slow. Keras resolves
# "auto" to False where no accelerator is visible: there it repeats False.
@pytest.mark.parametrize("jit_compile, case", each_value(
    [False, True, pytest.param("auto", marks=() if gpu_available() else (pytest.mark.slow,))],
    LAYER_CASES,
))
def test_fit_under_every_jit_compile_setting(jit_compile, case, rng):
    x = tf.nest.map_structure(lambda a: np.concatenate([np.asarray(a, "float32")] * 8),
                              case.inputs(rng))
    inputs = tf.nest.map_structure(lambda a: keras.Input(a.shape[1:]), x)
    outputs = tf.nest.flatten(case.apply(case.make(), inputs))
    features = keras.layers.Concatenate()([keras.layers.Flatten()(o) for o in outputs]) \
        if len(outputs) > 1 else keras.layers.Flatten()(outputs[0])
    model = keras.Model(inputs, keras.layers.Dense(1)(features))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=jit_compile)
    history = model.fit(x, np.ones((24, 1), "float32"), epochs=3, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][-1] < history.history["loss"][0]


def _tracing_count(implementation):
    return DENSE._functions[implementation].experimental_get_tracing_count()


def test_graph_path_stops_retracing_once_shapes_vary(rng):
    layer = layers.Dense(8, implementation="graph")
    before = _tracing_count("graph")
    for batch in (1, 2, 3, 5, 8, 13):
        for time in (4, 9):
            layer(rng.standard_normal((batch, time, 6)).astype("float32"))
    # the first shape, then one relaxed trace per axis that varies (batch, time): at
    # most three traces for twelve shapes (fewer when an earlier test in this process
    # left a relaxed trace of this kernel), and none for the shapes after them
    assert _tracing_count("graph") - before <= 3
    settled = _tracing_count("graph")
    for batch, time in ((21, 5), (3, 17)):
        layer(rng.standard_normal((batch, time, 6)).astype("float32"))
    assert _tracing_count("graph") == settled


def test_xla_path_compiles_once_per_shape(rng):
    # XLA needs static shapes: each new input shape is a new program (documented)
    layer = layers.Dense(8, implementation="xla")
    x = rng.standard_normal((4, 6)).astype("float32")
    layer(x)
    before = _tracing_count("xla")
    for _ in range(3):
        layer(x)
    assert _tracing_count("xla") == before


def test_a_model_with_variable_batch_and_sequence_length_predicts_without_error(rng):
    inputs = keras.Input((None, 6))
    model = keras.Model(inputs, layers.Dense(3, activation="relu")(inputs))
    for batch, time in [(1, 1), (2, 7), (5, 3), (3, 11)]:
        y = model.predict(rng.standard_normal((batch, time, 6)).astype("float32"), verbose=0)
        assert y.shape == (batch, time, 3)


def test_tf_function_wrapping_a_model_retraces_once_per_varying_axis(rng):
    model = keras.Sequential([keras.Input((None, 6)), layers.Dense(3, implementation="graph")])
    step = tf.function(lambda x: model(x), reduce_retracing=True)
    for batch, time in [(1, 1), (2, 7), (5, 3), (3, 11), (8, 2)]:
        step(rng.standard_normal((batch, time, 6)).astype("float32"))
    assert step.experimental_get_tracing_count() <= 3
