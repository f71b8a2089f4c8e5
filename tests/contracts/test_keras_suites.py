"""Keras's own layer tests, shipped in its wheel, run against fastlayers' drop-in layers.

Each file of ``SUITES`` runs in one pytest subprocess with fastlayers' class in place
of Keras's (tests/keras_substitution.py). Every test of a file must pass, or be named in
``EXCLUDED`` with the reason, or skip by a condition Keras's test itself states for the
TensorFlow backend (named in ``SKIPPED_BY_KERAS``).
"""

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import keras
import pytest

KERAS_LAYER_TESTS = Path(keras.__file__).parent / "src" / "layers"

# fastlayers layer -> Keras's test file for it, under keras/src/layers. A new drop-in
# layer is one line here, named as keras.src.layers names it (GroupedQueryAttention).
SUITES = {
    "Dense": "core/dense_test.py",
    "MultiHeadAttention": "attention/multi_head_attention_test.py",
    "MaxPooling2D": "pooling/max_pooling_test.py",
    "GroupedQueryAttention": "attention/grouped_query_attention_test.py",
    "LayerNormalization": "normalization/layer_normalization_test.py",
    "RMSNormalization": "normalization/rms_normalization_test.py",
}

# "file::Class::test" -> why the test cannot hold for fastlayers' layer.
EXCLUDED = {}

# "file::Class::test" -> the skip condition Keras's test states, which holds on TensorFlow
# for Keras's class as for ours.
SKIPPED_BY_KERAS = {
    "attention/multi_head_attention_test.py::MultiHeadAttentionTest::test_basics_with_flash_attention":
        "Keras: flash attention only on JAX and Torch",
    "attention/multi_head_attention_test.py::MultiHeadAttentionTest::test_flash_attention_with_errors":
        "Keras: flash attention not supported on TensorFlow",
    "attention/grouped_query_attention_test.py::GroupedQueryAttentionTest::test_basics_with_flash_attention":
        "Keras: flash attention only on JAX and Torch",
    "attention/grouped_query_attention_test.py::GroupedQueryAttentionTest::test_flash_attention_with_errors":
        "Keras: flash attention not supported on TensorFlow",
}


def _outcomes(report: Path) -> dict[str, str]:
    """Test id ("file::Class::test") -> "passed", "failed" or "skipped", from a JUnit report."""
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        module = case.get("classname").split(".")
        path = "/".join(module[:-1]) + ".py"
        test_id = f"{path}::{module[-1]}::{case.get('name')}"
        if case.find("skipped") is not None:
            outcomes[test_id] = "skipped"
        elif case.find("failure") is not None or case.find("error") is not None:
            outcomes[test_id] = "failed"
        else:
            outcomes[test_id] = "passed"
    return outcomes


@pytest.fixture(scope="module")
def keras_suite_outcomes(tmp_path_factory):
    """Runs every file of SUITES once, all substitutions in place, in one process."""
    workdir = tmp_path_factory.mktemp("keras_suites")
    report = workdir / "report.xml"
    env = {
        **os.environ,
        "FASTLAYERS_SUBSTITUTE": ",".join(SUITES),
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    completed = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "keras_substitution",
            "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:xdist",
            f"--rootdir={KERAS_LAYER_TESTS}", f"--junitxml={report}", "-o", "junit_family=xunit1",
            *SUITES.values(),
        ],
        cwd=KERAS_LAYER_TESTS,
        env=env,
        capture_output=True,
        text=True,
    )
    if not report.exists():
        pytest.fail(f"Keras's tests did not run:\n{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}")
    return _outcomes(report), completed.stdout


@pytest.mark.parametrize("layer", list(SUITES))
def test_kerass_own_tests_pass_with_our_layer(keras_suite_outcomes, layer):
    outcomes, log = keras_suite_outcomes
    path = SUITES[layer]
    mine = {test_id: outcome for test_id, outcome in outcomes.items() if test_id.startswith(path + "::")}
    assert mine, f"no test of {path} ran:\n{log[-4000:]}"
    failed = sorted(
        test_id for test_id, outcome in mine.items() if outcome == "failed" and test_id not in EXCLUDED
    )
    assert not failed, f"{len(failed)} of Keras's tests fail with fastlayers' {layer}: {failed}\n{log[-8000:]}"
    skipped = {test_id for test_id, outcome in mine.items() if outcome == "skipped"}
    expected_skips = {test_id for test_id in SKIPPED_BY_KERAS if test_id.startswith(path + "::")}
    assert skipped == expected_skips


def test_every_exclusion_names_a_test_that_still_needs_it(keras_suite_outcomes):
    outcomes, _ = keras_suite_outcomes
    for test_id, reason in {**EXCLUDED, **SKIPPED_BY_KERAS}.items():
        assert reason.strip(), test_id
        assert test_id in outcomes, f"{test_id} is not a test of Keras's suites (renamed?)"
    passing = sorted(test_id for test_id in EXCLUDED if outcomes[test_id] == "passed")
    assert not passing, f"excluded tests that pass now (remove them from EXCLUDED): {passing}"
