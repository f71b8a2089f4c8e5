"""A Transformer classifier built from Keras layers, accelerated, as pytest-benchmark cases.

Run ``pytest bench/test_models.py --benchmark-only``. The model is
``fastlayers.bench.model_bench.keras_transformer_classifier`` (two pre-norm blocks
of width 256, 4 heads, causal, on 16 sequences of 256 tokens); ``accelerated`` is
``fastlayers.layers.accelerate(model)``. One group per (step, device): ``predict``
(a forward call in a ``tf.function``) and ``train step`` (``train_on_batch``, Adam,
sparse categorical cross-entropy). The target is 1.3x the original's training
step; ``fastlayers bench --model FILE.keras`` measures a saved model the same way,
interleaved. GPU cases skip with a reason when TensorFlow sees no GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from fastlayers import layers
from fastlayers.bench import cases, model_bench, pytest_adapter

BATCH, LENGTH, CLASSES = 16, 256, 10
ROUNDS = 5
DEVICES = pytest_adapter.DEVICE_PARAMS  # "gpu" skips with a reason when none is visible


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", model_bench.STEPS)
@pytest.mark.parametrize("provider", ("keras", "accelerated"))
def test_transformer_classifier(benchmark, provider, step, device):
    with tf.device(cases.tf_device(device)):
        model = model_bench.keras_transformer_classifier(length=LENGTH, classes=CLASSES)
        if provider == "accelerated":
            model = layers.accelerate(model, verbose=False)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        rng = np.random.default_rng(0)
        tokens = tf.constant(rng.integers(0, 1000, (BATCH, LENGTH)), tf.int32)
        labels = tf.constant(rng.integers(0, CLASSES, BATCH), tf.int32)
        run = model_bench.steps(model, tokens, labels)[step]
        run()  # trace and compile outside the timed rounds
        benchmark.group = f"transformer classifier {step} B={BATCH} T={LENGTH} {device}"
        benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
