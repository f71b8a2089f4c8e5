"""pytest-benchmark cases for Dense beyond float inference: LoRA training and int8.

Run ``pytest bench/test_dense_variants.py --benchmark-only``; one ``benchmark.group``
per case, with fastlayers' ``layers.Dense`` and ``keras.layers.Dense`` under the same
weights as providers. pytest-benchmark runs a group's providers one after another,
not interleaved: on a shared machine compare medians over several runs.
GPU cases skip with a reason when TensorFlow sees no GPU.

Targets (issue 17): a LoRA (rank 8) training step at least as fast as Keras's; an
int8-quantized ``Dense(4096, relu)`` on 4096x1024 at least 8x Keras's int8 Dense and
1.5x fastlayers' float32 Dense, eagerly and in a ``tf.function``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from fastlayers import layers
from fastlayers.bench import cases, pytest_adapter

DEVICES = pytest_adapter.DEVICE_PARAMS
PROVIDERS = ("fastlayers", "keras")
MODES = ("eager", "function")

# M rows of K features into N units: the Dense bench's shape.
M, K, N = 4096, 1024, 4096
LORA_RANK = 8


def _dense(provider, **kwargs):
    return layers.Dense(**kwargs) if provider == "fastlayers" else keras.layers.Dense(**kwargs)


def _inputs(shape):
    return tf.constant(np.random.default_rng(0).standard_normal(shape), tf.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_lora_training_step(benchmark, provider, device):
    with tf.device(cases.tf_device(device)):
        layer = _dense(provider, units=N, activation="relu")
        layer.build((None, K))
        layer.enable_lora(LORA_RANK)
        layer.lora_kernel_b.assign(tf.random.normal((LORA_RANK, N), stddev=0.01))
        optimizer = keras.optimizers.SGD(1e-3)
        optimizer.build(layer.trainable_variables)
        x = _inputs((M, K))

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(layer(x)))
            optimizer.apply(tape.gradient(loss, layer.trainable_variables), layer.trainable_variables)
            return loss

        call = lambda: step().numpy()  # noqa: E731
        call()
        benchmark.group = f"LoRA Dense rank {LORA_RANK} training step {M}x{K} -> {N} float32"
        benchmark.pedantic(call, rounds=7, iterations=1, warmup_rounds=1)


def int8_dense(provider):
    """Dense(N, relu) on K features, quantized to int8 the way Keras quantizes it."""
    layer = _dense(provider, units=N, activation="relu", bias_initializer="random_normal")
    layer.build((None, K))
    layer.quantize("int8")
    return layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS + ("fastlayers-float32",))
def test_int8_inference(benchmark, provider, mode, device):
    with tf.device(cases.tf_device(device)):
        if provider == "fastlayers-float32":
            layer = layers.Dense(N, activation="relu")
            layer.build((None, K))
        else:
            layer = int8_dense(provider)
        x = _inputs((M, K))
        forward = layer if mode == "eager" else tf.function(layer)
        call = lambda: forward(x).numpy()  # noqa: E731
        call()
        benchmark.group = f"int8 Dense {M}x{K} -> {N} relu, {mode}"
        benchmark.pedantic(call, rounds=7, iterations=1, warmup_rounds=1)
