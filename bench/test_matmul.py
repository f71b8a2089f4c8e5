"""Matmul throughput: the Dense suite, as pytest-benchmark cases.

Run from the repository with ``pytest bench --benchmark-only`` (add
``--benchmark-json``, ``--benchmark-save``, ``--benchmark-compare`` as usual).
Cases come from ``fastlayers.bench.cases.DENSE``, the registry ``fastlayers
bench`` runs too: ``Dense(4096, relu)`` on a ``4096x1024`` input for each
fastlayers implementation (auto and explicit), ``keras.layers.Dense`` and
``tf.matmul`` of the same shape (the peak row), called eagerly and inside a
``tf.function``, under every dtype policy. ``extra_info`` holds GFLOP/s and the
fraction of the peak row; pytest-benchmark groups the rows of one shape, mode,
policy and device together. ``--bench-sizes 256,1024`` runs other sizes.
"""

import pytest

from fastlayers.bench import cases, runner

SUITE = cases.DENSE


def pytest_generate_tests(metafunc):
    metafunc.parametrize("size", SUITE.sizes_from(metafunc.config.getoption("--bench-sizes")))


# The first decorator varies fastest: one group's providers run back to back.
@pytest.mark.parametrize("provider", SUITE.provider_names)
@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("policy", cases.POLICIES)
@pytest.mark.parametrize("device", cases.DEVICE_PARAMS)
def test_dense(benchmark, provider, size, mode, policy, device):
    case = cases.Case(SUITE, size, policy, mode, device, SUITE.provider(provider))
    runner.benchmark_case(benchmark, case)
