"""fastlayers.bench: benchmark suites, FLOP counts, the machine's peak, the CLI.

Needs the ``bench`` extra (``pip install "fastlayers[bench]"``); the library does not.

- ``cases``: the suites, declared once as data (Triton-style: sizes, providers,
  FLOP counts), run by the CLI and by pytest-benchmark alike;
- ``runner``: timing (interleaved rounds, medians) and ``bench_layer``;
- ``report``: results, the ratios within a group, the table, comparisons;
- ``machine``: the CPU, its flags and the library versions a result names;
- ``files``: the ``--json`` results and atomic writes; ``plot``: ``--plot``;
- ``flops``: the FLOP formulas and TensorFlow's op counter for layers with none;
- ``layer_spec``: the layer named to ``--layer`` and ``fastlayers profile`` (a
  built-in with its ``LAYER_DEFAULTS`` row, or a user's ``module:Class``);
- ``profile``: TensorBoard profiler traces of layers;
- ``cli``: the ``fastlayers`` command, one registered ``Command`` per subcommand;
- ``pytest_adapter`` and the ``test_*.py`` modules: the suites under pytest-benchmark.
"""
