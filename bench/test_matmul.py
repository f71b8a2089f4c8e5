"""Matmul throughput: the Dense and matmul suites, as pytest-benchmark cases.

Run from the repository with ``pytest bench --benchmark-only`` (add
``--benchmark-json``, ``--benchmark-save``, ``--benchmark-compare`` as usual).
Cases come from ``fastlayers.bench.cases.DENSE``, the registry ``fastlayers
bench`` runs too: ``Dense(4096, relu)`` on a ``4096x1024`` input for each
fastlayers implementation (auto and explicit), ``keras.layers.Dense`` and
``tf.matmul`` of the same shape (the peak row), called eagerly and inside a
``tf.function``, under every dtype policy. ``extra_info`` holds GFLOP/s and the
fraction of the peak row; pytest-benchmark groups the rows of one shape, mode,
policy and device together. The matmul suite times the dense kernel alone on
square matrices against ``keras.ops.matmul`` and ``tf.matmul``.
``--bench-sizes 256,1024`` runs other sizes than the suites' quick sizes.
"""

import pytest
from fastlayers.bench import cases, pytest_adapter


def pytest_generate_tests(metafunc):
    suite = {"test_dense": cases.DENSE, "test_matmul": cases.MATMUL}[metafunc.function.__name__]
    metafunc.parametrize("size", suite.sizes_from(metafunc.config.getoption("--bench-sizes")))


# The first decorator varies fastest: one group's providers run back to back.
@pytest.mark.parametrize("provider", cases.DENSE.provider_names)
@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("policy", cases.POLICIES)
@pytest.mark.parametrize("device", pytest_adapter.DEVICE_PARAMS)
def test_dense(benchmark, provider, size, mode, policy, device):
    suite = cases.DENSE
    pytest_adapter.benchmark_case(
        benchmark, cases.Case(suite, size, policy, mode, device, suite.provider(provider))
    )


@pytest.mark.parametrize("provider", cases.MATMUL.provider_names)
@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("policy", cases.POLICIES)
@pytest.mark.parametrize("device", pytest_adapter.DEVICE_PARAMS)
def test_matmul(benchmark, provider, size, mode, policy, device):
    suite = cases.MATMUL
    pytest_adapter.benchmark_case(
        benchmark, cases.Case(suite, size, policy, mode, device, suite.provider(provider))
    )
