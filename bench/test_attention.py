"""Attention throughput and memory, as pytest-benchmark cases.

Run from the repository with ``pytest bench/test_attention.py --benchmark-only``
(``-m slow`` adds the long-sequence memory cases). The throughput cases come from
``fastlayers.bench.cases.ATTENTION`` and ``ATTENTION_BACKWARD``, the registry
``fastlayers bench --suite attention,attention-backward`` runs too: ``B=4, N=8,
H=64`` at ``T=S`` of the suites' quick size (``--bench-sizes 2048`` for others),
float32 and bfloat16, eager and in a ``tf.function``. One group per (suite, size,
dtype, mode, device); its rows:

- ``fastlayers`` (auto) and each implementation of ``kernels.dot_product_attention``;
- ``keras``/``keras-xla``: ``keras.ops.dot_product_attention`` as called and under
  XLA (the baseline: the faster of them);
- ``tf.matmul``: a square matmul of side ``cases.ATTENTION_PEAK_SIDE``, the peak.

``benchmark.extra_info`` holds ``gflops`` (``bench.flops.attention_flops``; the
peak row's are its matmul's) and ``fraction_of_peak``, measured interleaved with
the peak row. A Transformer-block training step compares
``layers.MultiHeadAttention`` with Keras's.
The memory cases run each measurement in a fresh subprocess and report its peak
resident memory (``VmHWM``) above its resident memory once a small warm-up call
has run and the inputs exist.
GPU rows skip with a reason when TensorFlow sees no GPU.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

import keras
import pytest
import tensorflow as tf
from fastlayers import layers
from fastlayers.bench import cases, pytest_adapter

ROUNDS = 3
DTYPES = ("float32", "bfloat16")
DEVICES = pytest_adapter.DEVICE_PARAMS  # "gpu" skips with a reason when none is visible
SUITES = (cases.ATTENTION, cases.ATTENTION_BACKWARD)


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ == "test_attention":
        sizes = cases.ATTENTION.sizes_from(metafunc.config.getoption("--bench-sizes"))
        metafunc.parametrize("size", sizes)


# The first decorator varies fastest: one group's providers run back to back.
@pytest.mark.parametrize("provider", cases.ATTENTION.provider_names)
@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("suite", SUITES, ids=lambda suite: suite.name)
@pytest.mark.parametrize("device", DEVICES)
def test_attention(benchmark, provider, size, mode, dtype, suite, device):
    pytest_adapter.benchmark_case(
        benchmark, cases.Case(suite, size, dtype, mode, device, suite.provider(provider)),
        rounds=ROUNDS,
    )


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
        # The native ops: per-thread tiles and per-head float32 accumulators only.
        ("native", 32768, False, 1 * GIB),
        ("native", 8192, True, 2 * GIB),
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


# ---------------------------------------------------------------------------------
# GroupQueryAttention with a sliding window: the layer against Keras's.

GQA = dict(head_dim=64, num_query_heads=8, num_key_value_heads=2, sliding_window=256)
GQA_WIDTH = GQA["head_dim"] * GQA["num_query_heads"]


def _gqa_forward(provider, t, implementation=None):
    """A traced causal forward of ``provider``'s layer on a [1, t, 512] input, warmed up."""
    if provider == "keras":
        layer = keras.layers.GroupQueryAttention(**GQA)
    else:
        layer = layers.GroupQueryAttention(**GQA, implementation=implementation)
    x = tf.random.normal([1, t, GQA_WIDTH])
    forward = tf.function(lambda x: layer(x, x, use_causal_mask=True))
    forward(x).numpy()
    return lambda: forward(x).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("provider", ("keras", "fastlayers"))
def test_group_query_attention_forward(benchmark, provider):
    """Causal GQA forward, 8 query heads, 2 key/value heads, head_dim 64, T=4096,
    sliding_window=256, in a tf.function (target: 4x Keras's layer)."""
    benchmark.group = "GroupQueryAttention forward T=4096 window=256 N=8 K=2 H=64 causal"
    benchmark.pedantic(_gqa_forward(provider, 4096), rounds=ROUNDS, iterations=1)


@pytest.mark.slow
def test_group_query_attention_forward_speedup(benchmark):
    """The same two forwards interleaved, medians: ours at least 4x Keras's."""
    benchmark.group = "GroupQueryAttention forward T=4096 window=256 speed-up"
    ours, theirs = _gqa_forward("fastlayers", 4096), _gqa_forward("keras", 4096)
    times = {"fastlayers": [], "keras": []}

    def interleaved():
        for name, run in (("fastlayers", ours), ("keras", theirs)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    benchmark.pedantic(interleaved, rounds=5, iterations=1)
    speedup = statistics.median(times["keras"]) / statistics.median(times["fastlayers"])
    benchmark.extra_info["speedup_vs_keras"] = round(speedup, 2)
    assert speedup >= 4.0, f"{speedup:.2f}x Keras's layer, target 4x"


_GQA_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    from fastlayers import layers
    implementation, t, config = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    width = config["head_dim"] * config["num_query_heads"]

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    layer = layers.GroupQueryAttention(**config, implementation=implementation)
    run = lambda x: layer(x, x, use_causal_mask=True)
    # Warm-up on a short input first (code pages, the built weights), as for the kernel.
    run(tf.random.normal([1, 512, width])).numpy()
    x = tf.random.normal([1, t, width])
    x.numpy()
    base = rss()
    run(x).numpy()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"base": base, "peak": peak}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ("xla", "graph"))
def test_group_query_attention_peak_memory(benchmark, implementation):
    """The T=32768 causal windowed forward within 1 GiB of peak memory above its input."""
    benchmark.group = "GroupQueryAttention peak memory above inputs T=32768 window=256"

    def measure():
        done = subprocess.run(
            [sys.executable, "-c", _GQA_MEMORY_SCRIPT, implementation, "32768", json.dumps(GQA)],
            capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), check=True,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return result["peak"] - result["base"]

    used = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info["peak_mib_above_inputs"] = round(used / 2**20, 1)
    assert used < GIB, f"{used / GIB:.2f} GiB above inputs, limit 1 GiB"
