"""pytest-benchmark cases for the tutorial layers: auto vs reference vs Keras's equivalent.

Run ``pytest bench/test_layers.py --benchmark-only``; one ``benchmark.group`` per
layer. Each case calls the layer eagerly on a fixed input and waits for the result.
pytest-benchmark runs the cases of a group one after another, not interleaved: on a
shared machine compare medians over several runs.
GPU cases skip with a reason when TensorFlow sees no GPU.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from fastlayers import layers
from fastlayers.bench import cases, pytest_adapter

DEVICES = pytest_adapter.DEVICE_PARAMS  # "gpu" skips with a reason when none is visible
# "auto" and "reference" are fastlayers implementations; "keras" is Keras's own
# layer (or the Lambda a tutorial writes) on the same input.
PROVIDERS = ("auto", "reference", "keras")


def _implementation(provider):
    return None if provider == "auto" else provider


def _run(benchmark, device, make_layer, inputs, group, rounds=15):
    with tf.device(cases.tf_device(device)):
        layer = make_layer()
        inputs = tf.nest.map_structure(tf.constant, inputs)
        call = lambda: tf.nest.map_structure(lambda t: t.numpy(), layer(inputs))  # noqa: E731
        call()  # build, trace and compile outside the timed rounds
        benchmark.group = group
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_max_pooling2d(benchmark, provider, device):
    # The target shape: a ResNet stem's activations, 64x112x112x64 float32.
    x = np.random.default_rng(0).standard_normal((64, 112, 112, 64), np.float32)
    make = (
        keras.layers.MaxPooling2D
        if provider == "keras"
        else lambda: layers.MaxPooling2D(implementation=_implementation(provider))
    )
    _run(benchmark, device, make, x, "MaxPooling2D 2x2 64x112x112x64 float32", rounds=7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_max_pooling2d_channels_first(benchmark, provider, device):
    x = np.random.default_rng(0).standard_normal((16, 64, 112, 112), np.float32)
    kwargs = dict(data_format="channels_first")
    make = (
        (lambda: keras.layers.MaxPooling2D(**kwargs))
        if provider == "keras"
        else lambda: layers.MaxPooling2D(**kwargs, implementation=_implementation(provider))
    )
    group = "MaxPooling2D 2x2 channels_first 16x64x112x112 float32"
    _run(benchmark, device, make, x, group, rounds=7)


MASK = np.ones((128, 128))
MASK[62:66, 62:66] = 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fixed_mask(benchmark, provider, device):
    x = np.random.default_rng(0).standard_normal((256, 128, 128), np.float32)
    # Keras's nearest equivalent: the tutorial's Lambda multiplying by a constant.
    constant = tf.constant(MASK, tf.float32)
    make = (
        (lambda: keras.layers.Lambda(lambda t: t * constant))
        if provider == "keras"
        else lambda: layers.FixedMask(MASK, implementation=_implementation(provider))
    )
    _run(benchmark, device, make, x, "FixedMask 256x128x128 float32")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_center_zero(benchmark, provider, device):
    x = np.random.default_rng(0).standard_normal((256, 128, 128), np.float32)
    constant = tf.constant(MASK, tf.float32)  # the tutorial's centerZero: a product
    make = (
        (lambda: keras.layers.Lambda(lambda t: t * constant))
        if provider == "keras"
        else lambda: layers.CenterZero((4, 4), implementation=_implementation(provider))
    )
    _run(benchmark, device, make, x, "CenterZero 4x4 of 256x128x128 float32")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_exponential(benchmark, provider, device):
    x = np.random.default_rng(0).standard_normal((256, 128, 128), np.float32)
    make = (
        (lambda: keras.layers.Lambda(lambda t: tf.exp(t)))
        if provider == "keras"
        else lambda: layers.Exponential(implementation=_implementation(provider))
    )
    _run(benchmark, device, make, x, "Exponential 256x128x128 float32")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", ("auto", "reference"))
def test_residual_projection(benchmark, provider, device):
    # No Keras layer has two inputs and two outputs like this one: auto vs reference.
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4096, 512), np.float32)
    b = rng.standard_normal((4096, 512), np.float32)
    make = lambda: layers.ResidualProjection(512, implementation=_implementation(provider))  # noqa: E731
    _run(benchmark, device, make, [a, b], "ResidualProjection 4096x512 -> 512 float32")
