"""Every layer survives .keras files (safe mode) and SavedModel export; damage is reported."""

import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from layer_cases import LAYER_CASES

from fastlayers import layers, testing


@pytest.mark.parametrize("case", LAYER_CASES, ids=str)
@pytest.mark.parametrize("implementation", [None, "xla"])
def test_keras_file_round_trip_in_safe_mode(case, implementation, rng, tmp_path):
    testing.assert_keras_round_trip(case.make(implementation=implementation), case.inputs(rng), tmp_path,
                                    call=case.apply)


def _model(case, rng):
    inputs = tf.nest.map_structure(lambda a: np.asarray(a, "float32"), case.inputs(rng))
    symbolic = tf.nest.map_structure(lambda a: keras.Input(a.shape[1:]), inputs)
    return keras.Model(symbolic, case.apply(case.make(), symbolic)), inputs


@pytest.mark.parametrize("case", LAYER_CASES, ids=str)
def test_saved_model_export_reloads_with_tf_saved_model_load(case, rng, tmp_path):
    model, inputs = _model(case, rng)
    model.export(tmp_path / "exported", format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "exported"))
    served = reloaded.serve(inputs)
    for actual, expected in zip(tf.nest.flatten(served), tf.nest.flatten(model(inputs))):
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


def _saved(tmp_path):
    model = keras.Sequential([keras.Input((3,)), layers.Dense(2)])
    path = tmp_path / "model.keras"
    model.save(path)
    return path, path.read_bytes()


def test_a_truncated_keras_file_fails_with_kerass_error(tmp_path):
    path, data = _saved(tmp_path)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"accessible `.keras` zip file"):
        keras.saving.load_model(path, safe_mode=True)


def test_a_corrupted_keras_file_fails_its_checksum(tmp_path):
    path, data = _saved(tmp_path)
    damaged = bytearray(data)
    middle = len(damaged) // 3
    damaged[middle:middle + 200] = bytes(b ^ 0xFF for b in damaged[middle:middle + 200])
    path.write_bytes(bytes(damaged))
    with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
        keras.saving.load_model(path, safe_mode=True)
