"""FLOP counts for the benchmarks.

The analytic formulas are defined once in ``fastlayers.kernels.flops``, where
auto-dispatch uses them too (kernels may not import the bench package); code with no
formula, such as a user's layer, is counted by TensorFlow's op counter.
"""

from fastlayers.kernels.flops import (  # noqa: F401
    ATTENTION_BACKWARD_FACTOR,
    attention_flops,
    dense_flops,
    gflops_per_second,
)

TF_OP_COUNTER = "TensorFlow's op counter (tf.compat.v1.profiler, float_operation)"


def counted_flops(graph) -> int:
    """FLOPs of a traced graph by TensorFlow's op counter, for code with no formula.

    The counter adds up the statistics TensorFlow registers per op type (MatMul
    2·M·K·N, element-wise arithmetic one per element, pooling, reductions...);
    ops with no registered count (``Exp``, ``Select``, calls of nested functions)
    count 0, so a graph of such ops counts 0 FLOPs.
    """
    import tensorflow as tf

    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    logger = tf.get_logger()
    level = logger.level
    # The counter's v1 shape helper logs a deprecation warning on first use.
    logger.setLevel("ERROR")
    try:
        return int(tf.compat.v1.profiler.profile(graph, options=options).total_float_ops)
    finally:
        logger.setLevel(level)
