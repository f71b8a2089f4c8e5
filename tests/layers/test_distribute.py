"""fastlayers layers train under tf.distribute.MirroredStrategy like on one device."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).with_name("distributed_training.py")


# Each case trains in a subprocess with two logical devices (about 10 s): auto's
# choice by default, the explicit paths with -m slow.
@pytest.mark.parametrize("implementation", [
    "auto", *(pytest.param(name, marks=pytest.mark.slow) for name in ("reference", "graph"))
])
def test_mirrored_training_matches_one_device(implementation):
    run = subprocess.run(
        [sys.executable, str(SCRIPT), implementation],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    single, mirrored = np.array(result["single"]), np.array(result["mirrored"])
    assert single[-1] < 0.5 * single[0], single  # it learned something
    np.testing.assert_allclose(mirrored, single, rtol=1e-4)
