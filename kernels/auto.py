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

AUTO = {
    "dense": {
        # 2-core AMD EPYC (Zen 3, AVX2), TF 2.21, Dense(4096, relu) on 4096x1024:
        # Eigen graph 86 (float32) / 80 (bfloat16); XLA 143-151 / 141-160.
        ("cpu", "*"): ("xla", "graph", "reference"),
        # same machine with oneDNN on: float32 graph 170, XLA 161-169; bfloat16 has
        # no instructions here, so graph casts operands to float32 (see the bench).
        ("cpu-onednn", "*"): ("graph", "xla", "reference"),
        # AVX-512 BF16 EPYC: float32 graph ~200 vs XLA ~160; bfloat16 graph ~400 vs
        # XLA ~170 (XLA upcasts bfloat16 dots to float32 on CPU).
        ("cpu-onednn-bf16", "*"): ("graph", "xla", "reference"),
        ("gpu", "*"): ("graph", "xla", "reference"),
    },
}

AUTO["dot_product_attention"] = {
    # 2-core AMD EPYC (Zen 3, AVX2), TF 2.21, forward B=4 N=8 H=64 T=S=2048, medians of
    # 3 interleaved runs on a loaded machine, as ratios to the best
    # keras.ops.dot_product_attention path (eager/graph/XLA) and to the best 4096²
    # tf.matmul (graph/XLA) of the same run:
    #   float32:  XLA 1.33-1.56x Keras (0.55-0.57 of peak), graph 0.86-0.98x;
    #   bfloat16: XLA 1.34x Keras's XLA (0.44-0.54 of the bfloat16 peak), graph 1.08x;
    #   float32 forward+backward: XLA 1.04-1.05x Keras's XLA, graph 0.71-0.74x.
    # XLA's dot beats Eigen's, and its loop fuses the online softmax's elementwise ops.
    ("cpu", "*"): ("xla", "graph", "reference"),
    # Not measured with oneDNN on; XLA does not use oneDNN, so the ranking above holds
    # unless oneDNN's graph matmul overtakes XLA's (it does for Dense: see above).
    ("cpu-onednn", "*"): ("xla", "graph", "reference"),
    ("cpu-onednn-bf16", "*"): ("xla", "graph", "reference"),
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
