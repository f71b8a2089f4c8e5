"""Names the test modules share (fixtures live in conftest.py).

The dtype lists and checks are fastlayers.testing's, the ones users run too.
"""

import pytest
import tensorflow as tf

from fastlayers.testing import COMPILED, IMPLEMENTATIONS, NUMPY_DTYPES, POLICIES, round_to

__all__ = ["COMPILED", "DEVICES", "IMPLEMENTATIONS", "NUMPY_DTYPES", "POLICIES", "gpu_available", "round_to"]


def gpu_available() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


DEVICES = (
    "CPU",
    pytest.param(
        "GPU",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not gpu_available(), reason="no GPU visible to TensorFlow"),
        ],
    ),
)
