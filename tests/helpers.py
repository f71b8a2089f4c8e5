"""Names the test modules share (fixtures live in conftest.py)."""

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16", "float16", "bfloat16")
IMPLEMENTATIONS = (None, "reference", "graph", "xla")
COMPILED = ("graph", "xla")
NUMPY_DTYPES = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
}


def round_to(x, dtype):
    """``x`` rounded to ``dtype`` and widened to float64, as a kernel receives it."""
    return np.asarray(x).astype(NUMPY_DTYPES[tf.as_dtype(dtype).name]).astype(np.float64)


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
