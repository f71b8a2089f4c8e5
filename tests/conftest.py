"""Fixtures every test module shares: dtype policies, seeds, a clean Keras state."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# XLA's LLVM backend without its optimization passes: XLA's own (HLO) passes still
# run, and without fast-math flags LLVM's passes change no floating-point result,
# only how fast the code runs; compiling takes half the time (an attention gradient:
# 8 s -> 5 s), and the tests compile XLA functions by the hundred.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


def _private_cache_dir():
    """Tests see the shipped auto table, never the records a `fastlayers tune` left in
    the user's cache: they get a cache directory of their own, whose ``native`` is the
    user's (the op's builds are keyed by source and flags, and slow to compile)."""
    user = Path(os.environ.get("FASTLAYERS_CACHE_DIR") or Path.home() / ".cache" / "fastlayers")
    (user / "native").mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix="fastlayers-tests-"))
    (private / "native").symlink_to(user / "native", target_is_directory=True)
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    return private


os.environ["FASTLAYERS_CACHE_DIR"] = str(_private_cache_dir())

import gc  # noqa: E402

import fastlayers.kernels  # noqa: E402, F401
import fastlayers.layers  # noqa: E402, F401
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow  # noqa: E402, F401
from helpers import POLICIES  # noqa: E402

# TensorFlow and Keras leave some 300,000 long-lived objects behind their imports, and
# the traced functions every kernel keeps grow the heap test by test; a full collection
# (Keras's clear_session runs one after each test) walked them all, 0.5-0.8 s a test.
# Frozen, they are skipped: each collection scans only what the last test made.
gc.freeze()


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
    keras.backend.clear_session()  # and a full collection
    gc.freeze()  # what survived it lives on (caches, traced functions): never scan it again
