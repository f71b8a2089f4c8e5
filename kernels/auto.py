"""The auto-dispatch table: which implementation ``implementation=None`` runs.

One row per kernel, keyed by ``(platform, dtype name)`` (``"*"`` matches any dtype),
each an ordered tuple: auto takes the first entry that supports the call. Platforms
are ``fastlayers.kernels.dispatch.PLATFORMS``. The figures beside each row are
GFLOP/s from ``fastlayers bench`` on the machine named; rerun it to check yours.

Why CPU rows differ by platform: TensorFlow runs its CPU matmuls on Eigen unless
oneDNN is on (the default only on CPUs with AVX512-VNNI/BF16 or AMX;
``TF_ENABLE_ONEDNN_OPTS=1`` elsewhere). XLA's CPU dot beats Eigen's, and only a
CPU with bfloat16 instructions makes bfloat16 faster than float32.

GPU rows are not measured here (no GPU on the machines this table was made on);
they follow TensorFlow's own fused matmul + bias + activation kernels (cuBLASLt
epilogues, grappler's remapper), which the graph path reaches.
"""

# An eager call of a compiled path pays TensorFlow's function-call overhead (about
# 0.2-0.5 ms here) on top of the work; below this many FLOPs the reference's eager
# ops finish first. Measured on the 2-core EPYC with kernels.dense, relu epilogue:
# at 2·M·K·N = 2e6 (64x128x128) reference 392 us, graph 611, XLA 548; at 3.4e7
# (256x256x256) reference 762 us, XLA 1048; at 1.3e8 (256x512x512) all within 8%;
# at 2.7e8 (512x512x512) XLA 0.84x the reference. Applies only to kernels that
# state their work, and only in eager mode: inside a graph there is no call overhead.
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
        # 2-core AMD EPYC (Zen 3, AVX2), TF 2.21, Dense(4096, relu) on 4096x1024:
        # Eigen graph 86 (float32) / 80 (bfloat16); XLA 143-151 / 141-160.
        ("cpu", "*"): ("xla", "graph", "reference"),
        # same machine with oneDNN on: float32 graph 170, XLA 161-169; bfloat16 has
        # no instructions here, so graph casts operands to float32 (see the bench).
        ("cpu-onednn", "*"): ("graph", "xla", "reference"),
        # 2-core AMD EPYC (Zen 4, AVX-512 with BF16), oneDNN on by default: float32
        # graph 217 vs XLA 182 (function), 212 vs 183 (eager); mixed_bfloat16 graph 426
        # vs XLA 178 (XLA computes bfloat16 dots in float32 on CPU).
        ("cpu-onednn-bf16", "*"): ("graph", "xla", "reference"),
        ("gpu", "*"): ("graph", "xla", "reference"),
    },
    # Rows below: ratios of median time to the reference's on the 2-core AMD EPYC
    # (Zen 3, AVX2), TF 2.21, interleaved runs on a shared machine (lower is faster).
    # The "cpu" rows were measured with oneDNN off; there only max pooling was
    # measured with TF_ENABLE_ONEDNN_OPTS=1 (oneDNN has its own pooling). The
    # "cpu-onednn-bf16" rows were measured on a 2-core Zen 4 EPYC, where oneDNN is on
    # by default; those figures are speeds (higher is faster), as the comments say.
    "max_pool2d": {
        # Measured with 2x2/2 windows, which now have their own row after this
        # table; the other windows (3x3/2 "same" below) rank the same way.
        # channels_last 2x2/2 on 64x112x112x64 float32: keras 0.90-1.0, graph
        # 0.90-1.13 (all three run TF's MaxPool op), XLA's reduce-window 1.13-1.33
        # (XLA slices or reshapes instead: 1.02-1.08; the op is memory-bound). The
        # layer with auto vs Keras's layer, 31 alternating pairs: 1.02 (IQR 0.98-1.06);
        # 3x3/2 "same": graph 0.89-1.20, XLA 1.50-1.83; float16 and bfloat16 on
        # 16x112x112x64: graph 1.11-1.13, XLA 7.6-10.3; forward+backward on
        # 32x112x112x64: graph 0.85-1.08, XLA 1.21-1.82. With oneDNN: float32 keras
        # 1.03, graph 1.03, XLA 0.93 (within noise); float16/bfloat16 XLA 3.2-11.
        ("cpu", "*"): ("reference", "graph", "xla"),
        ("cpu-onednn", "*"): ("reference", "graph", "xla"),
        ("cpu-onednn-bf16", "*"): ("reference", "graph", "xla"),
        ("gpu", "*"): ("graph", "xla", "reference"),
    },
    "max_pool2d_channels_first": {
        # Measured with 2x2/2 windows (now the tiled row after this table) before
        # they pooled by element-wise passes; reduce-window pools the other windows
        # NCHW in place the same way. 2x2/2 on 32x64x112x112 float32: XLA pools NCHW
        # in place at 0.08 (one pass instead of two transposes, which Keras also
        # runs: keras 1.10).
        # Forward+backward: XLA 0.91 called eagerly, 0.55 inside one jit-compiled
        # step (its tiled-window gradient replaces select-and-scatter, which took 1.23).
        ("cpu", "float32"): ("xla", "graph", "reference"),
        ("cpu-onednn", "float32"): ("xla", "graph", "reference"),
        ("cpu-onednn-bf16", "float32"): ("xla", "graph", "reference"),
        # float16/bfloat16 on 16x64x112x112: XLA 1.46 (its low-precision loops are
        # slow on this CPU), graph 0.69-0.86. With oneDNN: float32 XLA 0.26, bfloat16
        # XLA 0.63 (oneDNN's bfloat16 transposes are slower), float16 XLA 2.30.
        ("cpu", "*"): ("graph", "reference", "xla"),
        ("cpu-onednn", "bfloat16"): ("xla", "graph", "reference"),
        ("cpu-onednn", "*"): ("graph", "reference", "xla"),
        ("cpu-onednn-bf16", "bfloat16"): ("xla", "graph", "reference"),
        ("cpu-onednn-bf16", "*"): ("graph", "reference", "xla"),
        ("gpu", "*"): ("graph", "xla", "reference"),
    },
    "fixed_mask": {
        # x * mask on 256x128x128: float32 XLA 0.90-1.13, graph 1.08-2.74 (a lone
        # element-wise op gains nothing from a function call); float16/bfloat16 XLA
        # 2.8-4.7, graph 1.05-1.14. Zen 4 with oneDNN (`fastlayers bench --layer
        # FixedMask`, speed relative to the reference): eager graph 0.82-0.83, XLA
        # 0.22-0.77; in a tf.function graph 1.00-1.13, XLA 0.20-0.71.
        ("cpu", "*"): ("reference", "graph", "xla"),
        ("cpu-onednn", "*"): ("reference", "graph", "xla"),
        ("cpu-onednn-bf16", "*"): ("reference", "graph", "xla"),
        ("gpu", "*"): ("graph", "xla", "reference"),
    },
    "center_zero": {
        # 256x128x128: XLA fuses the window test into the select, no mask in memory:
        # float32 0.53-0.85, float16 0.38-0.52, bfloat16 0.44-0.53; graph 0.59-1.04.
        # Zen 4 with oneDNN, speed relative to the reference: XLA 2.2-3.6 eager,
        # 1.3-2.5 in a tf.function; graph 1.4-1.8 eager, 1.0 in a tf.function.
        ("cpu", "*"): ("xla", "graph", "reference"),
        ("cpu-onednn", "*"): ("xla", "graph", "reference"),
        ("cpu-onednn-bf16", "*"): ("xla", "graph", "reference"),
        ("gpu", "*"): ("xla", "graph", "reference"),
    },
    "exponential": {
        # exp on 256x128x128: bfloat16 XLA 0.79-0.87, graph 1.08-1.19. Zen 4 with
        # oneDNN, speed relative to the reference: bfloat16 XLA 1.25 eager, 1.77 in a
        # tf.function; float32 XLA 0.96 / 1.14, float16 XLA 0.30 / 0.31.
        ("cpu", "bfloat16"): ("xla", "reference", "graph"),
        ("cpu-onednn", "bfloat16"): ("xla", "reference", "graph"),
        ("cpu-onednn-bf16", "bfloat16"): ("xla", "reference", "graph"),
        # float32 XLA 0.47-1.46 (noise: no clear winner), graph 0.66-2.73;
        # float16 XLA 2.5-3.0, graph 0.90-1.05.
        ("cpu", "*"): ("reference", "graph", "xla"),
        ("cpu-onednn", "*"): ("reference", "graph", "xla"),
        ("cpu-onednn-bf16", "*"): ("reference", "graph", "xla"),
        ("gpu", "*"): ("graph", "xla", "reference"),
    },
    "residual_projection": {
        # a, b 4096x512, kernel 512x512: XLA 0.70-1.05 and graph 0.71-1.01 over three
        # runs in all three dtypes, within noise of each other; XLA's dot beats
        # Eigen's on larger matmuls (see "dense"), so the rows follow "dense". Zen 4
        # with oneDNN, speed relative to the reference: graph 1.38 / 1.12 / 1.78 eager
        # (float32 / float16 / bfloat16), 1.01 / 1.03 / 1.69 in a tf.function; XLA
        # 1.31 / 0.91 / 1.06 eager, 0.73 / 0.98 / 0.96.
        ("cpu", "*"): ("xla", "graph", "reference"),
        ("cpu-onednn", "*"): ("graph", "xla", "reference"),
        ("cpu-onednn-bf16", "*"): ("graph", "xla", "reference"),
        ("gpu", "*"): ("graph", "xla", "reference"),
    },
}


def _remeasured(row, platform, entries):
    """``row`` with every entry of ``platform`` replaced by ``entries``
    (``{dtype name or "*": implementations}``), the other platforms unchanged."""
    kept = {key: value for key, value in row.items() if key[0] != platform}
    return {**kept, **{(platform, dtype): order for dtype, order in entries.items()}}


# Windows that tile the input ("valid", strides == pool_size), which XLA pools and
# differentiates by element-wise passes over strided views. Measured on the 2-core
# AMD EPYC (Zen 4, oneDNN on) only; the other platforms keep the general rows.
# 2x2/2, as speed relative to Keras's layer (higher is faster), interleaved medians:
#   float32 forward on 64x112x112x64: reference 0.99-1.01 (TF's MaxPool, as Keras;
#   41 alternating pairs of the layers: 0.99), XLA 0.99-1.06; forward+backward on
#   32x112x112x64 inside a tf.function: XLA 0.33 (oneDNN's MaxPoolGrad reuses the
#   forward's workspace), called eagerly 1.76; mixed_float16 (no oneDNN kernel:
#   Eigen): forward XLA 1.35-2.6, forward+backward in a tf.function 3.12;
#   mixed_bfloat16: forward XLA 0.70-0.87, forward+backward 0.52.
AUTO["max_pool2d_tiled"] = _remeasured(AUTO["max_pool2d"], "cpu-onednn-bf16", {
    "float16": ("xla", "reference", "graph"),
    "*": ("reference", "graph", "xla"),
})
# channels_first, where Keras's layer transposes to channels_last and back: forward
# on 16x64x112x112 and 64x64x112x112, XLA in place: float32 3.0-3.8, mixed_bfloat16
# 2.3-5.5, mixed_float16 5.7-10.8; forward+backward on 32x64x112x112 inside a
# tf.function: float32 0.76 (called eagerly 2.08), mixed_bfloat16 0.95,
# mixed_float16 3.75. Forward wins; so does training but in float32 graphs.
AUTO["max_pool2d_channels_first_tiled"] = _remeasured(
    AUTO["max_pool2d_channels_first"], "cpu-onednn-bf16", {"*": ("xla", "graph", "reference")}
)

AUTO["dot_product_attention"] = {
    # 2-core AMD EPYC (Zen 3, AVX2), TF 2.21, B=4 N=8 H=64 T=S=2048, 256x256 tiles,
    # `fastlayers bench --suite attention[-backward] --sizes 2048 --modes function`
    # (medians of interleaved rounds, quiet machine), as ratios to the faster
    # keras.ops.dot_product_attention path (graph or XLA) and to a 2048² tf.matmul:
    #   float32 forward:  XLA 1.67x (0.70 of peak), graph 1.28x;
    #   bfloat16 forward: XLA 1.92x (0.74 of the bfloat16 peak), graph 1.34x;
    #   float32 forward+backward: XLA 1.67x, graph 1.09x.
    # XLA's dot beats Eigen's, and its loop fuses the online softmax's elementwise ops.
    # The native op (float32/float16/bfloat16, outside XLA clusters, no gradient tape
    # recording) fuses the whole block loop in registers and L1/L2: first wherever it
    # builds (`fastlayers bench --suite attention` shows it beside "xla").
    ("cpu", "*"): ("native", "xla", "graph", "reference"),
    # Not measured with oneDNN on an AVX2 CPU; XLA does not use oneDNN, so the ranking
    # above holds unless oneDNN's matmul and softmax overtake XLA's as they do below.
    ("cpu-onednn", "*"): ("xla", "graph", "reference"),
    # 2-core AMD EPYC (Zen 4, AVX-512 with BF16; oneDNN on), same command: the graph
    # path runs oneDNN's matmuls (bfloat16 ones natively) and its one-pass softmax over
    # 512x2048 tiles (256x256 when causal). Forward: graph 1.09-1.10x float32, 1.58-1.65x
    # bfloat16 (62% of the bfloat16 peak); XLA 0.81x, 0.74x (XLA computes bfloat16 dots
    # in float32 here). Forward+backward: graph 0.86-0.88x float32, 0.80x bfloat16; XLA
    # 0.75x, 0.59x. Keras's fastest path here is graph mode, on oneDNN's batched
    # matmuls; the backward's recomputed scores cost one matmul more than Keras's.
    ("cpu-onednn-bf16", "*"): ("graph", "xla", "reference"),
    # Not measured (no GPU here): XLA fuses each tile's softmax into one kernel.
    ("gpu", "*"): ("xla", "graph", "reference"),
}

AUTO["attention_pooling"] = {
    # 2-core AMD EPYC (Zen 3, AVX2), TF 2.21, B=64 T=512 F=256 with a mask, medians of
    # 15 interleaved runs, speed relative to graph: float32 XLA 1.26x, reference 0.27x;
    # bfloat16 XLA 1.49x, reference 0.81x (XLA fuses tanh, the masked softmax and casts).
    ("cpu", "*"): ("xla", "graph", "reference"),
    ("cpu-onednn", "*"): ("xla", "graph", "reference"),
    ("cpu-onednn-bf16", "*"): ("xla", "graph", "reference"),
    ("gpu", "*"): ("xla", "graph", "reference"),
}
