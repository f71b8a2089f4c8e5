"""fastlayers.testing: the checks fastlayers' own tests run, for your layers and kernels.

Every check compares against a numpy oracle you write in float64, using the one
tolerance table (``fastlayers.kernels.precision.TOLERANCES``) keyed by the dtype the
computation ran in, across implementations and Keras dtype policies.

Example (in your own pytest suite):

```python
from fastlayers import testing

def test_my_dense(tmp_path):
    def oracle(x, weights):
        kernel, bias = weights
        return np.maximum(x @ kernel + bias, 0)

    x = np.random.default_rng(0).standard_normal((4, 8))
    testing.assert_layer_matches(lambda **kw: MyDense(3, "relu", **kw), oracle, x)
    testing.assert_gradients_match_reference(lambda **kw: MyDense(3, "relu", **kw), x)
    testing.assert_keras_round_trip(MyDense(3, "relu"), x, tmp_path)

def test_my_kernel():  # a kernel from fastlayers.kernels.kernel, compiled= a faster algorithm
    x = np.linspace(-5, 5, 64)
    testing.assert_kernel_matches(my_softplus, lambda x: np.logaddexp(0, x), x)
    testing.assert_kernel_gradients_match_reference(my_softplus, x)
```
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile

import keras
import ml_dtypes
import numpy as np
import tensorflow as tf

from fastlayers.kernels.precision import tolerance

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16", "float16", "bfloat16")
IMPLEMENTATIONS = (None, "reference", "graph", "xla")
COMPILED = ("graph", "xla")
DTYPES = ("float16", "bfloat16", "float32")
NUMPY_DTYPES = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
}

__all__ = [
    "COMPILED",
    "DTYPES",
    "IMPLEMENTATIONS",
    "POLICIES",
    "assert_gradients_match_reference",
    "assert_kernel_gradients_match_reference",
    "assert_kernel_matches",
    "assert_keras_round_trip",
    "assert_layer_matches",
    "dtype_policy",
    "expected_retracing",
    "round_to",
]


def round_to(x, dtype):
    """``x`` rounded to ``dtype`` and widened to float64: what a kernel in ``dtype`` sees."""
    return np.asarray(x).astype(NUMPY_DTYPES[tf.as_dtype(dtype).name]).astype(np.float64)


@contextlib.contextmanager
def dtype_policy(name):
    """Sets Keras's global dtype policy for a block, restoring the previous one after."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield keras.config.dtype_policy()
    finally:
        keras.config.set_dtype_policy(previous)


class _NoRetracingWarning(logging.Filter):
    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def expected_retracing():
    """Drops TensorFlow's "triggered tf.function retracing" warning for a block.

    TensorFlow warns when one Python function is traced again and again, a mistake
    in a training loop (a ``tf.function`` created per step, Python numbers for
    tensors). Checks and benchmarks that build a new layer or kernel per
    implementation and dtype policy retrace by design; their warning is about a
    problem they do not have, and reads as if it were in the user's code. Other
    warnings still show.
    """
    logger, only = tf.get_logger(), _NoRetracingWarning()
    logger.addFilter(only)
    try:
        yield
    finally:
        logger.removeFilter(only)


def _retracing_expected(check):
    """Runs a check under :func:`expected_retracing`: it builds a layer or calls a kernel
    per implementation and policy."""

    @functools.wraps(check)
    def run(*args, **kwargs):
        with expected_retracing():
            return check(*args, **kwargs)

    return run


def _check(actual, expected, dtype, *, grad=False, what="output", names=None):
    actual_flat, expected_flat = tf.nest.flatten(actual), tf.nest.flatten(expected)
    assert len(actual_flat) == len(expected_flat), (
        f"{what}: {len(actual_flat)} results, the oracle gave {len(expected_flat)}"
    )
    names = names or [f"[{i}]" for i in range(len(actual_flat))]
    if grad:
        assert any(e is not None for e in expected_flat), (
            f"{what}: the reference has no gradient for any of {', '.join(names)}, "
            "so there is nothing to compare"
        )
    for name, a, e in zip(names, actual_flat, expected_flat):
        if a is None or e is None:
            assert a is None and e is None, (
                f"{what} {name}: no gradient "
                + ("here" if a is None else "in the expected result") + ", the other has one"
            )
            continue
        a = np.asarray(tf.cast(a, tf.float64) if isinstance(a, tf.Tensor) else a, np.float64)
        assert a.shape == np.shape(e), f"{what} {name}: shape {a.shape}, oracle {np.shape(e)}"
        tolerance(dtype, grad=grad).check(a, e, what=f"{what} {name}")


@_retracing_expected
def assert_kernel_matches(
    kernel, oracle, *inputs, dtypes=DTYPES, implementations=IMPLEMENTATIONS, **options
):
    """Every implementation of ``kernel`` in every dtype equals ``oracle`` within tolerance.

    Args:
        kernel: a fastlayers kernel (built-in or from ``fastlayers.kernels.kernel``).
        oracle: ``oracle(*inputs, **options)`` in numpy float64.
        *inputs: numpy arrays; each is rounded to the dtype before both calls.
        dtypes: dtypes to run in.
        implementations: implementations to run.
        **options: passed to the kernel and the oracle.
    """
    for dtype in dtypes:
        rounded = [round_to(x, dtype) for x in inputs]
        expected = oracle(*rounded, **options)
        for implementation in implementations:
            what = f"{dtype} implementation={implementation!r}"
            actual = kernel(
                *[tf.constant(x, dtype) for x in rounded],
                implementation=implementation,
                **options,
            )
            for i, output in enumerate(tf.nest.flatten(actual)):
                if output.dtype.is_floating:
                    assert output.dtype == dtype, (
                        f"{what}: output [{i}] is {output.dtype.name}, the inputs' dtype is {dtype}"
                    )
            _check(actual, expected, dtype, what=what)


@_retracing_expected
def assert_kernel_gradients_match_reference(
    kernel, *inputs, dtypes=DTYPES, implementations=COMPILED, **options
):
    """Gradients of each compiled path of ``kernel`` equal the reference's, per input.

    The loss is the sum of squares of the floating outputs in float32; every input
    is rounded to the dtype and watched. This is the check a hand-written compiled
    algorithm (``kernel(compiled=...)``) needs: its gradient is its own.

    Args:
        kernel: a fastlayers kernel (built-in or from ``fastlayers.kernels.kernel``).
        *inputs: numpy arrays.
        dtypes: dtypes to run in.
        implementations: implementations compared with ``"reference"``.
        **options: passed to the kernel.
    """

    def gradients(dtype, implementation):
        xs = [tf.constant(round_to(x, dtype), dtype) for x in inputs]
        with tf.GradientTape() as tape:
            tape.watch(xs)
            outputs = kernel(*xs, implementation=implementation, **options)
            loss = _sum_of_squares(outputs)
        return tape.gradient(loss, xs)

    names = [f"input [{i}]" for i in range(len(inputs))]
    for dtype in dtypes:
        expected = gradients(dtype, "reference")
        for implementation in implementations:
            _check(gradients(dtype, implementation), expected, dtype, grad=True, names=names,
                   what=f"gradients {dtype} implementation={implementation!r}")


def _sum_of_squares(outputs):
    return tf.add_n([
        tf.reduce_sum(tf.cast(o, tf.float32) ** 2)
        for o in tf.nest.flatten(outputs)
        if o.dtype.is_floating
    ])


@_retracing_expected
def assert_layer_matches(
    make_layer, oracle, inputs, *, policies=POLICIES, implementations=IMPLEMENTATIONS
):
    """A layer equals its numpy oracle under every policy and implementation.

    Also checks that outputs come in the policy's compute dtype and floating weights
    in its variable dtype (float32 under the mixed policies).

    Args:
        make_layer: ``make_layer(implementation=...)`` returns a new layer.
        oracle: ``oracle(inputs, weights)`` in numpy float64, where ``inputs`` has
            the structure given here and ``weights`` lists ``layer.weights``, both
            rounded to the policy's compute dtype.
        inputs: a numpy array, or a list of them for multi-input layers.
        policies: Keras dtype policies to run under.
        implementations: implementations to run.
    """
    for policy in policies:
        with dtype_policy(policy):
            for implementation in implementations:
                layer = make_layer(implementation=implementation)
                outputs = layer(tf.nest.map_structure(lambda x: np.asarray(x, "float32"), inputs))
                compute = layer.compute_dtype
                for output in tf.nest.flatten(outputs):
                    assert output.dtype == compute, (
                        f"{policy}: output dtype {output.dtype.name}, compute dtype {compute}"
                    )
                for weight in layer.weights:
                    assert not weight.dtype.startswith(("float", "bfloat")) or (
                        weight.dtype == layer.variable_dtype
                    ), (
                        f"{policy}: weight {weight.path} is {weight.dtype}, the variable "
                        f"dtype is {layer.variable_dtype}"
                    )
                weights = [round_to(w.numpy(), compute) for w in layer.weights]
                expected = oracle(tf.nest.map_structure(lambda x: round_to(x, compute), inputs), weights)
                _check(outputs, expected, compute,
                       what=f"policy={policy} implementation={implementation!r}")


@_retracing_expected
def assert_gradients_match_reference(
    make_layer, inputs, *, policies=POLICIES, implementations=COMPILED, seed=0
):
    """Gradients of each compiled path equal the reference's, for weights and inputs.

    Each layer is built after ``keras.utils.set_random_seed(seed)``, so every
    implementation starts from the same weights; the loss is the sum of squares of
    the outputs in float32.
    """

    def gradients(implementation):
        keras.utils.set_random_seed(seed)
        layer = make_layer(implementation=implementation)
        x = tf.nest.map_structure(lambda a: tf.constant(a, tf.float32), inputs)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = _sum_of_squares(layer(x))
        weights = layer.trainable_weights
        names = [w.path for w in weights] + [f"input {i}" for i in range(len(tf.nest.flatten(x)))]
        return layer.compute_dtype, names, tape.gradient(loss, [weights, x])

    for policy in policies:
        with dtype_policy(policy):
            compute, names, expected = gradients("reference")
            for implementation in implementations:
                _, _, actual = gradients(implementation)
                _check(actual, expected, compute, grad=True, names=names,
                       what=f"gradients policy={policy} implementation={implementation!r}")


def assert_keras_round_trip(layer, inputs, directory=None, *, call=None):
    """A model holding ``layer`` saves to ``.keras`` and loads with ``safe_mode=True`` unchanged.

    The file is written to a temporary directory and removed once loaded: nothing
    is left behind.

    Args:
        layer: an unbuilt or built layer instance.
        inputs: a numpy array (or list of them) of the layer's input, batch axis first.
        directory: where the temporary directory of the ``.keras`` file is made
            (e.g. pytest's ``tmp_path``, or ``"."``); None for the system's.
        call: optional ``call(layer, inputs)`` applying the layer to symbolic inputs
            of the structure of ``inputs``; the default is ``layer(inputs)``. For a
            layer that takes several tensors, e.g. ``lambda layer, x: layer(*x)``.

    Returns:
        The loaded model.
    """
    arrays = tf.nest.map_structure(lambda x: np.asarray(x, "float32"), inputs)
    symbolic = tf.nest.map_structure(lambda x: keras.Input(x.shape[1:]), arrays)
    outputs = layer(symbolic) if call is None else call(layer, symbolic)
    model = keras.Model(symbolic, outputs)
    with tempfile.TemporaryDirectory(prefix="fastlayers-", dir=directory) as scratch:
        path = os.path.join(scratch, f"{layer.name}.keras")
        model.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
    restored = next(l for l in loaded.layers if l.name == layer.name)
    assert type(restored) is type(layer), (
        f"the .keras file loaded a {type(restored).__module__}.{type(restored).__qualname__}, "
        f"not a {type(layer).__module__}.{type(layer).__qualname__}: two classes are "
        f"registered as {keras.saving.get_registered_name(type(layer))!r}"
    )
    restored_config, config = restored.get_config(), layer.get_config()
    changed = {
        key: (config.get(key), restored_config.get(key))
        for key in config.keys() | restored_config.keys()
        if config.get(key) != restored_config.get(key)
    }
    assert not changed, f"get_config() changed in the round trip, (saved, loaded): {changed}"
    outputs = zip(tf.nest.flatten(loaded(arrays)), tf.nest.flatten(model(arrays)))
    for i, (actual, expected) in enumerate(outputs):
        np.testing.assert_array_equal(
            np.asarray(actual), np.asarray(expected),
            err_msg=f"output [{i}] of the loaded model differs from the saved model's",
        )
    return loaded
