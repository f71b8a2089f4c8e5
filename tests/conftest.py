"""Fixtures every test module shares: dtype policies, seeds, a clean Keras state."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import POLICIES  # noqa: E402


@pytest.fixture(params=POLICIES)
def policy(request):
    """Sets the global Keras dtype policy for one test; float32 is restored after."""
    keras.config.set_dtype_policy(request.param)
    yield keras.config.dtype_policy()


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
