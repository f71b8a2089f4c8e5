"""pytest options of the benchmark suites (``pytest bench --benchmark-only``)."""


def pytest_addoption(parser):
    parser.addoption(
        "--bench-sizes",
        default=None,
        help="comma-separated sizes (each suite's x axis) instead of the suites' quick sizes",
    )

