"""Trains one small fastlayers model on one device and under MirroredStrategy on two
logical CPU devices; prints both loss curves as JSON. Run by test_distribute.py in a
fresh process, because logical devices must be set before TensorFlow starts."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from fastlayers import layers  # noqa: E402

(cpu,) = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)


def build(implementation):
    keras.utils.set_random_seed(7)
    inputs = keras.Input((6, 8))
    hidden = layers.Dense(16, activation="relu", implementation=implementation)(inputs)
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)
    outputs = layers.Linear(1, implementation=implementation)(pooled)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.3), loss="mse")
    return model


def losses(strategy, implementation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 6, 8)).astype("float32")
    y = x.mean(axis=(1, 2))[:, None] * 3.0
    with strategy.scope():
        model = build(implementation)
    history = model.fit(x, y, epochs=5, batch_size=64, shuffle=False, verbose=0)
    return history.history["loss"]


if __name__ == "__main__":
    implementation = None if sys.argv[1] == "auto" else sys.argv[1]
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    print(json.dumps({
        "replicas": mirrored.num_replicas_in_sync,
        "single": losses(tf.distribute.get_strategy(), implementation),
        "mirrored": losses(mirrored, implementation),
    }))
