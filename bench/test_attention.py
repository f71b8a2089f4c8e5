"""Attention throughput and memory, as pytest-benchmark cases.

Run from the repository with ``pytest bench/test_attention.py --benchmark-only``
(``-m slow`` adds the long-sequence memory cases). One group per (pass, dtype,
device) at ``B=4, N=8, H=64, T=S=2048``; its rows:

- ``fastlayers-auto`` and each implementation of ``kernels.dot_product_attention``;
- ``keras-eager``/``keras-graph``/``keras-xla``: ``keras.ops.dot_product_attention``
  called eagerly, in a ``tf.function`` and under XLA (the baseline: the best of them);
- ``peak-graph``/``peak-xla``: a square ``tf.matmul`` of size 4096, the machine's peak.

``benchmark.extra_info`` holds ``gflops_per_second`` (``bench.flops.attention_flops``)
and ``fraction_of_peak`` (of the best peak row measured in this process). A
Transformer-block training step compares ``layers.MultiHeadAttention`` with Keras's.
The memory cases run each measurement in a fresh subprocess and report its peak
resident memory (``VmHWM``) above its resident memory once a small warm-up call
has run and the inputs exist.
GPU rows skip with a reason when TensorFlow sees no GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from fastlayers import kernels, layers
from fastlayers.bench import cases
from fastlayers.bench.flops import attention_flops, dense_flops, gflops_per_second

B, N, H, T = 4, 8, 64, 2048
PEAK_SIZE = 4096
ROUNDS = 3
DTYPES = ("float32", "bfloat16")
DEVICES = cases.DEVICE_PARAMS  # "cpu", and "gpu" skipped with a reason when none is visible
ATTENTION_PROVIDERS = (
    "fastlayers-auto",
    "fastlayers-reference",
    "fastlayers-graph",
    "fastlayers-xla",
    "keras-eager",
    "keras-graph",
    "keras-xla",
)
PASSES = ("forward", "forward+backward")

# Best peak GFLOP/s per (dtype, device) measured in this process: the peak rows run
# first in each group (parametrize order), so the attention rows can quote a fraction.
_PEAK: dict[tuple[str, str], float] = {}


def _inputs(dtype, t=T, s=T, seed=0):
    rng = np.random.default_rng(seed)
    return [
        tf.constant(rng.standard_normal(shape).astype(np.float32), dtype)
        for shape in ((B, t, N, H), (B, s, N, H), (B, s, N, H))
    ]


def attention_step(provider, backward, q, k, v):
    """A no-argument callable running one forward (and backward) pass of ``provider``."""
    library, _, mode = provider.partition("-")
    if library == "fastlayers":
        implementation = None if mode == "auto" else mode

        def attend(q, k, v):
            return kernels.dot_product_attention(q, k, v, implementation=implementation)

        # The kernel compiles itself; a backward pass is wrapped like Keras's below.
        wrap_mode = {"reference": "eager", "graph": "graph"}.get(mode, "xla")
    else:
        attend = keras.ops.dot_product_attention
        wrap_mode = mode

    if backward:

        def step(q, k, v):
            with tf.GradientTape() as tape:
                tape.watch([q, k, v])
                loss = tf.reduce_sum(tf.cast(attend(q, k, v), tf.float32))
            return tape.gradient(loss, [q, k, v])

    else:
        step = attend
    if library == "fastlayers" and not backward:
        fn = step
    elif wrap_mode == "eager":
        fn = step
    else:
        fn = tf.function(step, jit_compile=wrap_mode == "xla")

    def run():
        result = fn(q, k, v)
        for t in tf.nest.flatten(result):
            t.numpy()  # waits for the computation

    return run


def _record(benchmark, flops, dtype, device):
    seconds = benchmark.stats.stats.median
    rate = gflops_per_second(flops, seconds)
    benchmark.extra_info["gflops_per_second"] = round(rate, 1)
    peak = _PEAK.get((dtype, device))
    if peak:
        benchmark.extra_info["fraction_of_peak"] = round(rate / peak, 3)
    return rate


@pytest.mark.parametrize("provider", ("peak-graph", "peak-xla") + ATTENTION_PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("device", DEVICES)
def test_attention(benchmark, provider, dtype, pass_, device):
    benchmark.group = f"attention {pass_} B={B} N={N} H={H} T=S={T} {dtype} {device}"
    with tf.device(cases.tf_device(device)):
        if provider.startswith("peak"):
            a = tf.cast(tf.random.normal([PEAK_SIZE, PEAK_SIZE]), dtype)
            matmul = tf.function(tf.matmul, jit_compile=provider == "peak-xla")
            run = lambda: matmul(a, a).numpy()  # noqa: E731
            flops = dense_flops(PEAK_SIZE, PEAK_SIZE, PEAK_SIZE)
        else:
            q, k, v = _inputs(dtype)
            run = attention_step(provider, pass_ != "forward", q, k, v)
            flops = attention_flops(B, T, T, N, H, backward=pass_ != "forward")
        run()  # trace and compile outside the timing
        benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    rate = _record(benchmark, flops, dtype, device)
    if provider.startswith("peak"):
        _PEAK[(dtype, device)] = max(rate, _PEAK.get((dtype, device), 0.0))


def _transformer_block(mha_class, width=256, heads=4):
    tokens = keras.Input((None, width))
    x = keras.layers.LayerNormalization()(tokens)
    x = tokens + mha_class(num_heads=heads, key_dim=width // heads)(x, x, use_causal_mask=True)
    y = keras.layers.LayerNormalization()(x)
    y = keras.layers.Dense(4 * width, activation="gelu")(y)
    return keras.Model(tokens, x + keras.layers.Dense(width)(y))


@pytest.mark.parametrize("provider", ("keras", "fastlayers"))
@pytest.mark.parametrize("device", DEVICES)
def test_transformer_block_training_step(benchmark, provider, device):
    """One SGD step of a pre-norm causal Transformer block, B=8, T=1024, width 256."""
    benchmark.group = f"transformer block training step B=8 T=1024 width=256 {device}"
    mha = layers.MultiHeadAttention if provider == "fastlayers" else keras.layers.MultiHeadAttention
    with tf.device(cases.tf_device(device)):
        model = _transformer_block(mha)
        optimizer = keras.optimizers.SGD(1e-3)
        x = tf.random.normal([8, 1024, 256])

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(x, training=True)))
            grads = tape.gradient(loss, model.trainable_weights)
            optimizer.apply(grads, model.trainable_weights)
            return loss

        step().numpy()
        benchmark.pedantic(lambda: step().numpy(), rounds=ROUNDS, iterations=1)


# ---------------------------------------------------------------------------------
# Memory: each case in its own process, so peaks of other cases do not count.

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf, keras
    from fastlayers import kernels
    provider, t, backward = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def inputs(t):
        q, k, v = (tf.random.normal([1, t, 8, 64], seed=i) for i in range(3))
        _ = [x.numpy() for x in (q, k, v)]
        return q, k, v

    if provider == "keras":
        attend = lambda q, k, v: keras.ops.dot_product_attention(q, k, v)
    else:
        attend = lambda q, k, v: kernels.dot_product_attention(q, k, v, implementation=provider)
    if backward:
        def run(q, k, v):
            with tf.GradientTape() as tape:
                tape.watch([q, k, v])
                loss = tf.reduce_sum(attend(q, k, v))
            return tape.gradient(loss, [q, k, v])
    else:
        run = attend
    # A small warm-up first: TensorFlow's and XLA's code pages are touched on first
    # use, hundreds of MiB of resident memory that is not the algorithm's.
    _ = [x.numpy() for x in tf.nest.flatten(run(*inputs(256)))]
    q, k, v = inputs(t)
    base = rss()
    outputs = run(q, k, v)
    _ = [x.numpy() for x in tf.nest.flatten(outputs)]
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec,
    # so a child of a large pytest process would report the parent's peak.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"base": base, "peak": peak}))
    """
)


def peak_memory_above_inputs(provider, t, backward):
    """Bytes of peak RSS above the RSS once the [1, t, 8, 64] inputs exist (subprocess)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, provider, str(t), "1" if backward else "0"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["peak"] - result["base"]


GIB = 1024**3


@pytest.mark.slow
@pytest.mark.parametrize(
    "provider, t, backward, limit",
    [
        ("xla", 32768, False, 1 * GIB),
        ("graph", 32768, False, 1 * GIB),
        ("xla", 8192, True, 2 * GIB),
        ("graph", 8192, True, 2 * GIB),
        # Contrast: Keras holds [1, 8, T, T] scores (and their softmax): 0.5 GiB a copy.
        ("keras", 4096, False, None),
    ],
)
def test_peak_memory(benchmark, provider, t, backward, limit):
    benchmark.group = "peak memory above inputs, B=1 N=8 H=64"
    used = benchmark.pedantic(
        peak_memory_above_inputs, args=(provider, t, backward), rounds=1, iterations=1
    )
    benchmark.extra_info["peak_mib_above_inputs"] = round(used / 2**20, 1)
    benchmark.extra_info["case"] = f"{provider} T=S={t} {'forward+backward' if backward else 'forward'}"
    if limit is not None:
        assert used < limit, f"{used / GIB:.2f} GiB above inputs, limit {limit / GIB:.0f} GiB"
