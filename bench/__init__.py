"""fastlayers.bench: benchmark suites, FLOP counts, the machine's peak, the CLI.

``cases`` declares the suites once (Triton-style data: sizes, providers, FLOP
counts), ``runner`` measures them for ``fastlayers bench`` (``cli``), the
``test_*.py`` modules run them under pytest-benchmark, ``flops`` holds the FLOP
formulas and TensorFlow's op counter for layers with none, ``layer_spec`` resolves
the layer named to ``fastlayers bench --layer`` and ``fastlayers profile`` (a
built-in or a user's ``module:Class``), and ``profile`` captures TensorBoard
profiler traces of layers.
"""
