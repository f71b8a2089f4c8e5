"""The auto-dispatch table: the prior ``implementation=None`` follows where this
machine has no tuned choice (``fastlayers.kernels.tuning``, ``fastlayers tune``).

One row per kernel, keyed by ``(platform, dtype name)`` (``"*"`` matches any dtype),
each an ordered tuple: auto takes the first entry that supports the call. Platforms
are ``fastlayers.kernels.platform.PLATFORMS``. A kernel whose fastest path depends on
a fact of the call names a row for it (``Kernel(auto_row=...)``), keyed
``(platform, dtype, row)``. Each row says why it is ordered so; the figures behind
it are the tuner's records and the README's results, each with the CPU measured.

Why CPU rows differ by platform: TensorFlow runs its CPU matmuls on Eigen unless
oneDNN is on (the default only on CPUs with AVX512-VNNI/BF16 or AMX;
``TF_ENABLE_ONEDNN_OPTS=1`` elsewhere). XLA's CPU dot beats Eigen's, and only a
CPU with bfloat16 instructions makes bfloat16 faster than float32.

GPU rows are not measured (no GPU on the machines this table was made on); they
follow TensorFlow's own fused matmul + bias + activation kernels (cuBLASLt
epilogues, grappler's remapper), which the graph path reaches.
"""

# An eager call of a compiled path pays TensorFlow's function-call overhead on top
# of the work; below this many FLOPs (as each built-in kernel states its work,
# ``fastlayers.kernels.flops``) the reference's eager ops finish first. Measured
# with kernels.dense, where the crossing lies between 3e7 and 3e8 FLOPs; for the
# memory-bound kernels (element-wise, pooling) a FLOP is one element's operation, so
# the same threshold keeps calls of up to about 1e8 elements on the reference,
# where a function call's fixed cost is as large as the work. Only in eager mode:
# inside a graph there is no call overhead.
EAGER_REFERENCE_BELOW_FLOPS = 1e8

# The row a user's kernel or CompiledLayer gets when it declares none: the dense
# row's reasoning holds for any matmul-bound code (XLA beats Eigen; oneDNN and GPU
# libraries beat XLA), and every path computes the same function.
DEFAULT = {
    ("cpu", "*"): ("xla", "graph", "reference"),
    ("cpu-onednn", "*"): ("graph", "xla", "reference"),
    ("cpu-onednn-bf16", "*"): ("graph", "xla", "reference"),
    ("gpu", "*"): ("graph", "xla", "reference"),
}

AUTO = {
    "dense": {
        # XLA's dot beats Eigen's matmul.
        ("cpu", "*"): ("xla", "graph", "reference"),
        # While a gradient tape records (a training step): inside a traced step the
        # graph path's ops are inlined into the step, where grappler fuses them with
        # their neighbours and the backward runs Eigen's matmuls on the saved
        # operands, as Keras's layer does. A nested XLA call is a cluster of its own
        # whose gradient is a second cluster, with the forward's intermediates as
        # extra outputs: at a Transformer's Dense sizes (M = 4096, K, N = 256..1024)
        # its forward + backward was slower than Keras's layer (0.7-0.8x), the graph
        # path's on par.
        ("cpu", "*", "training"): ("graph", "xla", "reference"),
        # oneDNN's fused matmul + bias + activation beats XLA's dot; bfloat16 without
        # bfloat16 instructions casts its operands to float32 (see rows_matmul).
        ("cpu-onednn", "*"): ("graph", "xla", "reference"),
        # oneDNN's native bfloat16 matmul, which XLA's CPU dot does not use.
        ("cpu-onednn-bf16", "*"): ("graph", "xla", "reference"),
        ("gpu", "*"): ("graph", "xla", "reference"),
    },
    "dense_int8": {
        # Keras's int8 Dense, fused. The native op (exact int16-pair products into
        # int32) beats XLA's int8 dot, which beats TensorFlow's int8 MatMul (slower
        # than its float32 one on Eigen CPUs). It takes float32 only: other dtypes
        # go on to XLA. Measured on the Zen 3 (AVX2); oneDNN rows follow it unmeasured.
        ("cpu", "*"): ("native", "xla", "graph", "reference"),
        ("cpu-onednn", "*"): ("native", "xla", "graph", "reference"),
        ("cpu-onednn-bf16", "*"): ("native", "xla", "graph", "reference"),
        ("gpu", "*"): ("graph", "xla", "reference"),
    },
    "max_pool2d": {
        # channels_last, windows that overlap or do not tile: TensorFlow's MaxPool,
        # the op Keras runs, is a memory-bound pass that XLA's reduce-window does
        # not beat; the graph path runs the same op behind a function call.
        ("cpu", "*"): ("reference", "graph", "xla"),
        ("cpu-onednn", "*"): ("reference", "graph", "xla"),
        ("cpu-onednn-bf16", "*"): ("reference", "graph", "xla"),
        ("gpu", "*"): ("graph", "xla", "reference"),
        # channels_last, windows that tile the input ("valid", strides == pool_size):
        # XLA pools and differentiates by element-wise passes over strided views.
        # float16 has no oneDNN kernel (Eigen's is slow), so XLA wins it where oneDNN
        # runs the other dtypes; elsewhere TF's op, as the general row.
        ("cpu", "*", "tiled"): ("reference", "graph", "xla"),
        ("cpu-onednn", "*", "tiled"): ("reference", "graph", "xla"),
        ("cpu-onednn-bf16", "float16", "tiled"): ("xla", "reference", "graph"),
        ("cpu-onednn-bf16", "*", "tiled"): ("reference", "graph", "xla"),
        ("gpu", "*", "tiled"): ("graph", "xla", "reference"),
        # channels_first: TF's CPU MaxPool takes NHWC only, so the reference (and
        # Keras) transposes there and back; XLA pools NCHW in place. XLA's
        # low-precision loops are slow on CPUs without bfloat16 instructions, and
        # oneDNN's bfloat16 transposes slower than XLA's.
        ("cpu", "float32", "channels_first"): ("xla", "graph", "reference"),
        ("cpu", "*", "channels_first"): ("graph", "reference", "xla"),
        ("cpu-onednn", "float32", "channels_first"): ("xla", "graph", "reference"),
        ("cpu-onednn", "bfloat16", "channels_first"): ("xla", "graph", "reference"),
        ("cpu-onednn", "*", "channels_first"): ("graph", "reference", "xla"),
        ("cpu-onednn-bf16", "float32", "channels_first"): ("xla", "graph", "reference"),
        ("cpu-onednn-bf16", "bfloat16", "channels_first"): ("xla", "graph", "reference"),
        ("cpu-onednn-bf16", "*", "channels_first"): ("graph", "reference", "xla"),
        ("gpu", "*", "channels_first"): ("graph", "xla", "reference"),
        # channels_first, tiled windows: the element-wise passes in place, with no
        # transpose at all, win in every dtype where measured (oneDNN with bfloat16
        # instructions); elsewhere as the general channels_first row.
        ("cpu", "float32", "channels_first_tiled"): ("xla", "graph", "reference"),
        ("cpu", "*", "channels_first_tiled"): ("graph", "reference", "xla"),
        ("cpu-onednn", "float32", "channels_first_tiled"): ("xla", "graph", "reference"),
        ("cpu-onednn", "bfloat16", "channels_first_tiled"): ("xla", "graph", "reference"),
        ("cpu-onednn", "*", "channels_first_tiled"): ("graph", "reference", "xla"),
        ("cpu-onednn-bf16", "*", "channels_first_tiled"): ("xla", "graph", "reference"),
        ("gpu", "*", "channels_first_tiled"): ("graph", "xla", "reference"),
    },
    "fixed_mask": {
        # One element-wise multiply: a function call only adds its fixed cost.
        ("cpu", "*"): ("reference", "graph", "xla"),
        ("cpu-onednn", "*"): ("reference", "graph", "xla"),
        ("cpu-onednn-bf16", "*"): ("reference", "graph", "xla"),
        ("gpu", "*"): ("graph", "xla", "reference"),
    },
    "center_zero": {
        # XLA fuses the window test into the select: no mask in memory.
        ("cpu", "*"): ("xla", "graph", "reference"),
        ("cpu-onednn", "*"): ("xla", "graph", "reference"),
        ("cpu-onednn-bf16", "*"): ("xla", "graph", "reference"),
        ("gpu", "*"): ("xla", "graph", "reference"),
    },
    "exponential": {
        # bfloat16: XLA computes exp in float32 in the same loop as the casts.
        ("cpu", "bfloat16"): ("xla", "reference", "graph"),
        ("cpu-onednn", "bfloat16"): ("xla", "reference", "graph"),
        ("cpu-onednn-bf16", "bfloat16"): ("xla", "reference", "graph"),
        # float32 has no clear winner over TF's own exp; XLA's float16 loop is slow.
        ("cpu", "*"): ("reference", "graph", "xla"),
        ("cpu-onednn", "*"): ("reference", "graph", "xla"),
        ("cpu-onednn-bf16", "*"): ("reference", "graph", "xla"),
        ("gpu", "*"): ("graph", "xla", "reference"),
    },
    "residual_projection": {
        # A matmul with the residual in its epilogue: as "dense".
        ("cpu", "*"): ("xla", "graph", "reference"),
        ("cpu-onednn", "*"): ("graph", "xla", "reference"),
        ("cpu-onednn-bf16", "*"): ("graph", "xla", "reference"),
        ("gpu", "*"): ("graph", "xla", "reference"),
    },
    "dot_product_attention": {
        # The native ops keep a whole block loop's scores, softmax and products in
        # registers and L1/L2, forward and backward (float32, float16 and bfloat16;
        # never inside an XLA cluster). Next, XLA's dot beats Eigen's, and its loop
        # fuses the online softmax's element-wise ops.
        ("cpu", "*"): ("native", "xla", "graph", "reference"),
        # Not measured with oneDNN on a CPU without bfloat16 instructions; XLA does
        # not use oneDNN, so the ranking above holds unless oneDNN's matmul and
        # softmax overtake XLA's as they do below.
        ("cpu-onednn", "*"): ("xla", "graph", "reference"),
        # The graph path runs oneDNN's matmuls (bfloat16 natively) and its one-pass
        # softmax over wide tiles; XLA computes bfloat16 dots in float32 here.
        ("cpu-onednn-bf16", "*"): ("graph", "xla", "reference"),
        # Not measured (no GPU here): XLA fuses each tile's softmax into one kernel.
        ("gpu", "*"): ("xla", "graph", "reference"),
    },
    "attention_pooling": {
        # XLA fuses tanh, the masked softmax and the casts around two small products.
        ("cpu", "*"): ("xla", "graph", "reference"),
        ("cpu-onednn", "*"): ("xla", "graph", "reference"),
        ("cpu-onednn-bf16", "*"): ("xla", "graph", "reference"),
        ("gpu", "*"): ("xla", "graph", "reference"),
    },
}

AUTO["layer_normalization"] = {
    # 2-core AMD EPYC (Zen 3, AVX2, oneDNN off), TF 2.21, 8192x1024, `fastlayers bench
    # --layer LayerNormalization` (interleaved medians on a heavily shared machine):
    # the native op reads each row from memory once and finishes it in L1, where XLA
    # reads it twice (a reduction fusion, then the element-wise one) and the graph
    # path runs the reference's ops one by one. While a gradient tape records the
    # native op steps aside (its gradient recomputes XLA's forward) for XLA.
    ("cpu", "*"): ("native", "xla", "reference", "graph"),
    # Not measured with oneDNN: grappler's oneDNN remapper fuses a LayerNorm pattern
    # of its own, which the graph path may reach; XLA does not use oneDNN.
    ("cpu-onednn", "*"): ("native", "xla", "reference", "graph"),
    ("cpu-onednn-bf16", "*"): ("native", "xla", "reference", "graph"),
    # Not measured (no GPU here): XLA fuses each row's reductions into one kernel.
    ("gpu", "*"): ("xla", "graph", "reference"),
}

# Same machine and command (`--layer RMSNormalization`), same reasons.
AUTO["rms_normalization"] = dict(AUTO["layer_normalization"])

# Per-kernel ``Kernel(eager_reference_below=...)``, in the kernel's work units
# (``fastlayers.kernels.flops``), for kernels whose fast path wins eagerly far below
# ``EAGER_REFERENCE_BELOW_FLOPS``. The normalization references run about six eager
# ops; the native op is one, and on the Zen 3 it beat them eagerly at every size
# timed, from a single row of 64 up. Where it cannot run, XLA's call was about
# even with the reference for a few rows and ahead from a few hundred.
EAGER_REFERENCE_BELOW = {
    "layer_normalization": 0,
    "rms_normalization": 0,
}
