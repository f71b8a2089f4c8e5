"""The dense-int8 bench suite: every provider builds and computes its problem, and the
fastlayers rows compute what Keras's int8 Dense computes."""

import numpy as np
import pytest

from fastlayers.bench import cases

SUITE = cases.SUITES["dense-int8"]


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_every_provider_runs(mode):
    results = {}
    for case in cases.cases(SUITE, [3], ["float32"], [mode], ["cpu"]):
        results[case.provider.name] = np.asarray(case.build()())
    assert set(results) == set(SUITE.provider_names)
    assert all(result.shape == (3, cases.DENSE_UNITS) for result in results.values())


def test_auto_runs_the_native_kernel_in_float32():
    case = cases.Case(SUITE, 4096, "float32", "function", "cpu", SUITE.provider("fastlayers"))
    assert case.provider_label == "fastlayers (auto: native, table)"
    assert not SUITE.headline
