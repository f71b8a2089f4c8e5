"""FLOP counts: the one place the benchmark formulas live.

Shape letters as in the kernels: dense ``[M, K]·[K, N]``; attention batch ``B``,
query length ``T``, key length ``S``, heads ``N``, head dim ``H``.
"""

from __future__ import annotations

# The backward pass of attention recomputes scores and runs four matmuls to the
# forward's two: counted, by convention, as 2.5 forward passes.
ATTENTION_BACKWARD_FACTOR = 2.5


def dense_flops(m: int, k: int, n: int) -> int:
    """``2·M·K·N``: one multiply and one add per term of each output."""
    return 2 * m * k * n


def attention_flops(
    b: int, t: int, s: int, n: int, h: int, *, causal: bool = False, backward: bool = False
) -> float:
    """``4·B·N·T·S·H`` for QKᵀ and PV; half when causal; times 3.5 forward+backward."""
    flops = 4.0 * b * n * t * s * h
    if causal:
        flops /= 2
    if backward:
        flops *= 1 + ATTENTION_BACKWARD_FACTOR
    return flops


def gflops_per_second(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9


# What the table and the JSON say about a count made by ``counted_flops``.
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
