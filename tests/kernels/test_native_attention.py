"""implementation="native": the C++ attention forward against the numpy oracle and the
reference (every mask and bias broadcast form, causal, grouped-query heads, dropout
positions, NaN in hidden positions, awkward sizes), its logsumexp, its gradient, its
ISA paths and threads, its refusals, and its build's failure paths."""

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import tensorflow as tf
from helpers import round_to
from attention_cases import make_case, native_against_reference_script, to_tensors
from oracles import attention_oracle

from fastlayers import kernels
from fastlayers.kernels import BlockSizes, tolerance
from fastlayers.kernels.native import attention as native_attention
from fastlayers.kernels.native import build as build_lib

DTYPES = ("float32", "float16", "bfloat16")
# Tiles smaller than the test lengths: several query and key blocks, partial ones last
# (key blocks round up to 16 columns, so 24 becomes 32).
SMALL_BLOCKS = BlockSizes(block_q=8, block_k=24)


def native(**kwargs):
    return kernels.dot_product_attention(implementation="native", **kwargs)


def library():
    return native_attention.load_library()


def raw_forward(q, k, v, *, bias=None, mask=None, scale=None, **attrs):
    """The op itself: ``(output, logsumexp)``."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    return library().fastlayers_attention_forward(
        q,
        k,
        v,
        tf.zeros([0, 0, 0, 0]) if bias is None else bias,
        tf.zeros([0, 0, 0, 0], tf.bool) if mask is None else mask,
        tf.zeros([0], tf.uint32),
        scale=scale,
        has_bias=bias is not None,
        has_mask=mask is not None,
        **attrs,
    )


@pytest.mark.parametrize("case", ["causal", "padding", "bias", "gqa", "fully_masked"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_numpy(rng, dtype, case):
    q, k, v, options = make_case(rng, case, dtype)
    tensors, kwargs = to_tensors(dtype, q, k, v, options)
    out = native(**tensors, **kwargs, block_sizes=SMALL_BLOCKS)
    assert out.dtype == tf.as_dtype(dtype)
    assert out.shape == (2, 37, 4, 8)
    tolerance(dtype).check(out.numpy(), attention_oracle(q, k, v, **options), what=f"{dtype} {case}")
    if case == "fully_masked":
        np.testing.assert_array_equal(out.numpy()[:, ::5].astype(np.float64), 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_reference_with_default_tiles(rng, dtype):
    q, k, v, options = make_case(rng, "causal", dtype, t=70, s=300, n=4, kv=2, h=16)
    tensors, kwargs = to_tensors(dtype, q, k, v, options)
    expected = kernels.dot_product_attention(**tensors, **kwargs, implementation="reference")
    tolerance(dtype).check(native(**tensors, **kwargs).numpy(), expected.numpy())


MASK_FORMS = ["BNTS", "B1TS", "1NTS", "BN1S", "B11S", "11TS", "111S", "BNT1", "1111"]


def form_shape(form, full):
    return tuple(size if letter != "1" else 1 for letter, size in zip(form, full))


@pytest.mark.parametrize("form", MASK_FORMS)
def test_every_mask_and_bias_broadcast_form(rng, form):
    b, t, s, n, kv, h = 2, 13, 21, 4, 2, 8
    q, k, v, _ = make_case(rng, "plain", "float32", b=b, t=t, s=s, n=n, kv=kv, h=h)
    shape = form_shape(form, (b, n, t, s))
    mask = rng.random(shape) > 0.4
    bias = rng.standard_normal(shape)
    out = native(
        query=tf.constant(q, tf.float32),
        key=tf.constant(k, tf.float32),
        value=tf.constant(v, tf.float32),
        bias=tf.constant(bias, tf.float32),
        mask=tf.constant(mask),
        block_sizes=SMALL_BLOCKS,
    )
    expected = attention_oracle(q, k, v, bias=bias, mask=mask)
    tolerance("float32").check(out.numpy(), expected, what=form)


def test_lower_rank_masks_broadcast_as_in_the_entry_point(rng):
    q, k, v, _ = make_case(rng, "plain", "float32", b=2, t=5, s=9, n=2, kv=2, h=8)
    mask = rng.random((5, 9)) > 0.3
    tensors, _ = to_tensors("float32", q, k, v, {})
    out = native(**tensors, mask=tf.constant(mask))
    tolerance("float32").check(out.numpy(), attention_oracle(q, k, v, mask=mask[None, None]))


@pytest.mark.parametrize(
    "t, s, h, d, causal",
    [
        (1, 1, 8, 8, False),
        (1, 203, 40, 40, True),
        (113, 203, 40, 40, False),
        (113, 203, 80, 80, True),
        (203, 113, 80, 24, True),
    ],
)
def test_awkward_sizes(rng, t, s, h, d, causal):
    q, k, v, _ = make_case(rng, "gqa", "float32", b=1, t=t, s=s, n=4, h=h, d=d)
    tensors, _ = to_tensors("float32", q, k, v, {})
    out = native(**tensors, is_causal=causal)
    tolerance("float32").check(out.numpy(), attention_oracle(q, k, v, is_causal=causal))


def test_a_thousand_and_twenty_three_keys(rng):
    q, k, v, _ = make_case(rng, "plain", "float32", b=1, t=1023, s=1023, n=1, kv=1, h=64)
    tensors, _ = to_tensors("float32", q, k, v, {})
    out = native(**tensors, is_causal=True)
    tolerance("float32").check(out.numpy(), attention_oracle(q, k, v, is_causal=True))


def test_grouped_query_heads_are_not_repeated(rng):
    # K/V heads 0 and 1 differ: a query head attending with the wrong one would show.
    q, k, v, _ = make_case(rng, "plain", "float32", b=1, t=9, s=11, n=6, kv=2, h=8)
    tensors, _ = to_tensors("float32", q, k, v, {})
    out = native(**tensors)
    tolerance("float32").check(out.numpy(), attention_oracle(q, k, v))


def test_logsumexp(rng):
    q, k, v, options = make_case(rng, "fully_masked", "float32", t=19, s=23)
    mask = tf.constant(options["mask"])
    _, lse = raw_forward(tf.constant(q, tf.float32), tf.constant(k, tf.float32), tf.constant(v, tf.float32),
                         mask=mask, is_causal=True, block_q=8, block_k=16)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    valid = options["mask"] & np.tril(np.ones((19, 23), bool))
    seen = valid.any(-1)
    logits = np.where(valid, logits, -np.inf)
    peak = logits.max(-1)
    with np.errstate(divide="ignore"):  # unseen rows: log(0), not compared
        expected = peak + np.log(np.exp(logits - np.where(seen, peak, 0)[..., None]).sum(-1))
    assert lse.shape == (2, 4, 19)
    tolerance("float32").check(lse.numpy()[seen], expected[seen])
    # A row that sees no key keeps the mask value: zero weight in any merge.
    np.testing.assert_array_equal(lse.numpy()[~seen], np.float32(kernels.mask_value(tf.float32)))


class TestDropout:
    def run(self, implementation, seed, rate=0.4, dtype=tf.float32):
        rng = np.random.default_rng(7)
        q, k, v = (
            tf.constant(rng.standard_normal(shape), dtype)
            for shape in ((2, 29, 4, 8), (2, 41, 2, 8), (2, 41, 2, 8))
        )
        return kernels.dot_product_attention(
            q, k, v, is_causal=True, dropout_rate=rate, seed=seed,
            block_sizes=SMALL_BLOCKS, implementation=implementation,
        )

    @pytest.mark.parametrize("seed", [3, [11, 1], 2**40 + 5])
    def test_same_output_as_reference(self, seed):
        expected = self.run("reference", seed=seed).numpy()
        tolerance("float32").check(self.run("native", seed=seed).numpy(), expected)

    def test_same_positions_as_reference(self):
        # q = k = 0 and one-hot values: each output entry is one row's (dropped) probability.
        s, t = 70, 33
        q = tf.zeros([2, t, 3, 4])
        k = tf.zeros([2, s, 3, 4])
        v = tf.broadcast_to(tf.reshape(tf.eye(s), [1, s, 1, s]), [2, s, 3, s])
        outs = [
            kernels.dot_product_attention(q, k, v, dropout_rate=0.3, seed=9, implementation=impl).numpy()
            for impl in ("reference", "native")
        ]
        np.testing.assert_array_equal(outs[1] > 0, outs[0] > 0)
        assert 0.6 < (outs[1] > 0).mean() < 0.8
        tolerance("float32").check(outs[1], outs[0])

    def test_gradients_match_reference(self):
        rng = np.random.default_rng(3)
        inputs = [tf.constant(rng.standard_normal(shape), tf.float32)
                  for shape in ((1, 13, 4, 8), (1, 21, 2, 8), (1, 21, 2, 8))]

        def grads(implementation):
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                out = kernels.dot_product_attention(
                    *inputs, dropout_rate=0.3, seed=4, implementation=implementation
                )
                loss = tf.reduce_sum(out * out)
            return tape.gradient(loss, inputs)

        for actual, expected in zip(grads("native"), grads("reference")):
            tolerance("float32", grad=True).check(actual.numpy(), expected.numpy())

    def test_half_precision(self):
        expected = self.run("reference", seed=5, dtype=tf.bfloat16).numpy()
        tolerance("bfloat16").check(self.run("native", seed=5, dtype=tf.bfloat16).numpy(), expected)


@pytest.mark.parametrize("variant", ["keys", "rows"])
def test_nan_in_hidden_positions_reaches_nothing(rng, variant):
    b, t, s, n, h = 2, 11, 17, 4, 8
    q, k, v, _ = make_case(rng, "gqa", "float32", b=b, t=t, s=s, n=n, h=h)
    mask = np.ones((b, 1, t, s), bool)
    mask[:, :, :, 12:] = False  # keys 12.. hidden from every row
    if variant == "rows":
        mask[:, :, 7:, :] = False  # query rows 7.. see no key
    clean = attention_oracle(q, k, v, mask=mask)
    q_bad, k_bad, v_bad = q.copy(), k.copy(), v.copy()
    k_bad[:, 12:] = np.nan
    v_bad[:, 12:] = np.inf
    if variant == "rows":
        q_bad[:, 7:] = np.nan
    out = native(query=tf.constant(q_bad, tf.float32), key=tf.constant(k_bad, tf.float32),
                 value=tf.constant(v_bad, tf.float32), mask=tf.constant(mask), block_sizes=SMALL_BLOCKS)
    assert np.isfinite(out.numpy()).all()
    tolerance("float32").check(out.numpy(), clean)
    if variant == "rows":
        np.testing.assert_array_equal(out.numpy()[:, 7:], 0.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["plain", "bias", "causal"])
def test_portable_primitives_match_the_vectorised_ones(rng, case, dtype):
    q, k, v, options = make_case(rng, case, dtype, t=21, s=45, h=40)
    tensors, kwargs = to_tensors(dtype, q, k, v, options)
    bias = kwargs.get("bias")
    args = dict(bias=None if bias is None else tf.cast(bias, tf.float32), is_causal=kwargs.get("is_causal", False))
    best, _ = raw_forward(*tensors.values(), **args)
    portable, _ = raw_forward(*tensors.values(), **args, isa="portable")
    tolerance(dtype).check(portable.numpy(), attention_oracle(q, k, v, **options), what="portable")
    tolerance(dtype).check(best.numpy(), portable.numpy(), what="best vs portable")


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        return set(next(line for line in f if line.startswith("flags")).split())


ISAS = ["amx", "avx512bf16", "avx512", "avx2", "portable"]  # best first


def best_isa():
    """The ISA the op should choose here: AMX in a build that emulates AVX-512 and
    AMX (test_native_avx512.py runs this file so), else the best the CPU reports
    (AMX only where Linux grants its tile data, which the op asks for itself)."""
    flags = cpu_flags()
    if "-DFASTLAYERS_EMULATE_AVX512" in os.environ.get("FASTLAYERS_NATIVE_CXXFLAGS", ""):
        return "amx"
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        if "avx512_bf16" not in flags:
            return "avx512"
        return "amx" if {"amx_tile", "amx_bf16"} <= flags else "avx512bf16"
    return "avx2" if {"avx2", "fma"} <= flags else "portable"


def test_reports_its_isa():
    available, detail = native_attention.build_status()
    assert available, detail
    assert detail == best_isa()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("isa", ISAS[:-1])
def test_an_isa_is_run_by_name_or_refused_by_name(rng, isa, dtype):
    """An ISA by name runs its primitives where the CPU has them (the same output as
    the portable ones) and is refused, naming what the CPU runs, where not."""
    q, k, v, _ = make_case(rng, "gqa", dtype, t=29, s=45, h=40)
    tensors = [tf.constant(a, dtype) for a in (q, k, v)]
    if ISAS.index(isa) >= ISAS.index(best_isa()):
        out, _ = raw_forward(*tensors, isa=isa)
        tolerance(dtype).check(out.numpy(), raw_forward(*tensors, isa="portable")[0].numpy())
    else:
        expected = f"isa='{isa}' needs a CPU that runs it; this one runs '{best_isa()}' at best"
        with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
            raw_forward(*tensors, isa=isa)


@pytest.mark.parametrize("with_bias", [False, True])
def test_gradients_match_the_reference(rng, with_bias):
    q, k, v, options = make_case(rng, "bias" if with_bias else "gqa", "float32", t=19, s=27)
    tensors, kwargs = to_tensors("float32", q, k, v, options)
    weights = tf.constant(rng.standard_normal((2, 19, 4, 8)), tf.float32)

    def grads(implementation):
        inputs = list(tensors.values()) + ([kwargs["bias"]] if with_bias else [])
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out = kernels.dot_product_attention(
                *inputs[:3], bias=inputs[3] if with_bias else None, is_causal=True,
                implementation=implementation,
            )
            loss = tf.reduce_sum(out * weights)
        return tape.gradient(loss, inputs)

    for actual, expected in zip(grads("native"), grads("reference")):
        tolerance("float32", grad=True).check(actual.numpy(), expected.numpy())


def test_gradients_in_a_function(rng):
    q, k, v, _ = make_case(rng, "gqa", "float32", t=9, s=12)
    tensors = [tf.constant(x, tf.float32) for x in (q, k, v)]

    @tf.function
    def step(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            loss = tf.reduce_sum(kernels.dot_product_attention(q, k, v, implementation="native") ** 2)
        return tape.gradient(loss, [q, k, v])

    def reference(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            loss = tf.reduce_sum(kernels.dot_product_attention(q, k, v, implementation="reference") ** 2)
        return tape.gradient(loss, [q, k, v])

    for actual, expected in zip(step(*tensors), reference(*tensors)):
        tolerance("float32", grad=True).check(actual.numpy(), expected.numpy())


class TestRefusals:
    def inputs(self, dtype=tf.float32):
        return [tf.ones([1, 4, 2, 8], dtype)] * 3

    def test_inside_an_xla_cluster_explicit_raises(self):
        @tf.function(jit_compile=True)
        def attend(q, k, v):
            return kernels.dot_product_attention(q, k, v, implementation="native")

        with pytest.raises(ValueError, match="implementation='native'.*cannot run inside an XLA cluster"):
            attend(*self.inputs())

    def test_inside_an_xla_cluster_auto_keeps_xla(self, rng):
        q, k, v, _ = make_case(rng, "plain", "float32", b=1, t=6, s=6, n=2, kv=2, h=8)

        @tf.function(jit_compile=True)
        def attend(q, k, v):
            return kernels.dot_product_attention(q, k, v)

        out = attend(tf.constant(q, tf.float32), tf.constant(k, tf.float32), tf.constant(v, tf.float32))
        tolerance("float32").check(out.numpy(), attention_oracle(q, k, v))

    def test_float64(self):
        with pytest.raises(ValueError, match="native kernel takes float32, float16 or bfloat16, not float64"):
            native(**dict(zip(("query", "key", "value"), self.inputs(tf.float64))))

    def test_on_gpu(self):
        from fastlayers.kernels.attention import ATTENTION

        with pytest.raises(ValueError, match="implementation='native'.*the native kernel runs on CPU only"):
            ATTENTION.select("native", platform="gpu", dtype=tf.float32)


class TestOpBadInput:
    """The op checks its inputs itself (a Python error, never an abort)."""

    def test_mismatched_shapes(self):
        q = tf.ones([1, 4, 2, 8])
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"must agree.*key.shape=\[1,4,2,6\]"):
            raw_forward(q, tf.ones([1, 4, 2, 6]), tf.ones([1, 4, 2, 8]))

    def test_heads_must_divide(self):
        with pytest.raises(tf.errors.InvalidArgumentError, match="K dividing N"):
            raw_forward(tf.ones([1, 4, 3, 8]), tf.ones([1, 4, 2, 8]), tf.ones([1, 4, 2, 8]))

    def test_mask_shape(self):
        q = tf.ones([1, 4, 2, 8])
        expected = (
            r"mask must have rank 4 and broadcast to \[B, N, T, S\] = \[1, 2, 4, 4\]. "
            r"Received: mask.shape=\[1,3,4,4\]"
        )
        with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
            raw_forward(q, q, q, mask=tf.ones([1, 3, 4, 4], tf.bool))

    def test_dropout_needs_a_seed(self):
        q = tf.ones([1, 4, 2, 8])
        with pytest.raises(tf.errors.InvalidArgumentError, match="seed must hold two uint32 words"):
            raw_forward(q, q, q, dropout_rate=0.5, dropout_scale=2.0)

    def test_dropout_rate_range(self):
        q = tf.ones([1, 4, 2, 8])
        expected = r"dropout_rate must be in \[0, 1\). Received: dropout_rate=1.5"
        with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
            raw_forward(q, q, q, dropout_rate=1.5)

    def test_block_sizes(self):
        q = tf.ones([1, 4, 2, 8])
        expected = "block_q and block_k must be positive. Received: block_q=0"
        with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
            raw_forward(q, q, q, block_q=0)


# --- the build -----------------------------------------------------------------------


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A process state where the library was never built, with an empty cache."""
    monkeypatch.setenv("FASTLAYERS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build_lib, "_failure", None)
    monkeypatch.setattr(build_lib, "_warned", set())
    monkeypatch.setattr(build_lib, "_loaded", None)
    return tmp_path


def test_cache_key_follows_flags_and_cache_dir(monkeypatch, fresh_build):
    first = build_lib.plan()
    assert first.directory.parent == fresh_build / "native"
    assert build_lib.plan().directory == first.directory
    monkeypatch.setenv("FASTLAYERS_NATIVE_CXXFLAGS", "-DFASTLAYERS_UNUSED=1")
    assert build_lib.plan().directory != first.directory
    assert "-DFASTLAYERS_UNUSED=1" in build_lib.plan().flags


def test_no_compiler(monkeypatch, fresh_build):
    monkeypatch.setenv("CXX", str(fresh_build / "no-such-compiler"))
    q = tf.ones([1, 4, 2, 8])
    expected = (
        r"implementation='native'.*could not be built: "
        r"no C\+\+ compiler: CXX='.*no-such-compiler' is not an executable"
    )
    with pytest.raises(ValueError, match=expected):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernels.dot_product_attention(q, q, q, implementation="native")
    assert native_attention.build_status() == (
        False,
        f"no C++ compiler: CXX='{fresh_build / 'no-such-compiler'}' is not an executable on PATH",
    )


def test_auto_skips_a_failed_build_with_one_warning(monkeypatch, fresh_build, rng):
    monkeypatch.setenv("CXX", str(fresh_build / "no-such-compiler"))
    q, k, v, _ = make_case(rng, "plain", "float32", b=1, t=16, s=16, n=2, kv=2, h=8)
    tensors = [tf.constant(x, tf.float32) for x in (q, k, v)]
    # Traced, so auto walks its row (an eager call this small runs the reference).
    attend = tf.function(lambda q, k, v: kernels.dot_product_attention(q, k, v))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attend(*tensors)
        attend(*tensors[:2], tensors[2] * 2.0)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages == [
        "fastlayers: the native attention kernel is unavailable: no C++ compiler: "
        f"CXX='{fresh_build / 'no-such-compiler'}' is not an executable on PATH"
    ]
    tolerance("float32").check(out.numpy(), attention_oracle(q, k, v))


def test_auto_takes_native_while_a_tape_records_too():
    from fastlayers.kernels.attention import ATTENTION, NATIVE_BLOCK_SIZES

    def choice(implementation, dtype=tf.float32):
        selection = ATTENTION.select(implementation, platform="cpu", dtype=dtype)
        return selection.implementation, selection.variant

    assert choice(None) == ("native", NATIVE_BLOCK_SIZES)
    assert choice(None, tf.float64)[0] == "xla"
    with tf.GradientTape():
        assert choice(None) == ("native", NATIVE_BLOCK_SIZES)
        assert choice(None, tf.float64)[0] == "xla"


def test_the_callers_tiles_reach_the_op_through_the_selection(monkeypatch):
    from fastlayers.kernels import attention as attention_lib

    seen = []
    run = native_attention.dot_product_attention_native

    def spy(*args, block_sizes, **options):
        seen.append(block_sizes)
        return run(*args, block_sizes=block_sizes, **options)

    monkeypatch.setattr(native_attention, "dot_product_attention_native", spy)
    q = tf.ones([1, 4, 2, 8])
    native(query=q, key=q, value=q)
    native(query=q, key=q, value=q, block_sizes=SMALL_BLOCKS)
    assert seen == [attention_lib.NATIVE_BLOCK_SIZES, SMALL_BLOCKS]


@pytest.mark.parametrize("length, labels", [
    (2048, ["native 64x512", "native 32x512", "native 128x256", "native 64x1024"]),
    # The op clips tiles to T and to S rounded up to 16: but for 32x512 (32x48),
    # all run as 40x48.
    (40, ["native 64x512", "native 32x512"]),
])
def test_the_tuner_times_the_native_tiles_that_differ(length, labels):
    from fastlayers.kernels import attention as attention_lib

    shape = (1, length, 2, 8)
    candidates = attention_lib.ATTENTION.tuning_candidates(
        platform="cpu", dtype=tf.float32, shapes=(shape,) * 3 + (None, None),
        scale=1.0, is_causal=False, dropout_rate=0.0, seed=None,
    )
    assert [c.label for c in candidates if c.implementation == "native"] == labels


def test_broken_flags_give_the_compiler_error(monkeypatch, fresh_build):
    monkeypatch.setenv("FASTLAYERS_NATIVE_CXXFLAGS", "-fno-such-flag-exists")
    expected = r"(?s)compiling attention.cc failed \(exit 1\): .*error: .*-fno-such-flag-exists"
    with pytest.raises(build_lib.BuildError, match=expected):
        build_lib.build()
    assert not list((fresh_build / "native").iterdir()), "a failed build leaves nothing in the cache"
    q = tf.ones([1, 4, 2, 8])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="could not be built: compiling attention.cc failed"):
            kernels.dot_product_attention(q, q, q, implementation="native")


@pytest.mark.slow
def test_address_sanitizer_build_runs_the_cases(tmp_path):
    """Builds the ops with -fsanitize=address and runs awkward, masked, dropped and
    causal cases forward and backward in a process with ASan preloaded: any
    out-of-bounds read aborts it."""
    # libstdc++ preloaded beside ASan: its __cxa_throw interceptor needs the real one
    # resolvable at start-up, before TensorFlow loads it.
    preload = " ".join(
        subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        for name in ("libasan.so", "libstdc++.so")
    )
    sizes = [(1, 1, 1, 1, 1, 8, 8), (2, 13, 203, 4, 2, 40, 40), (1, 113, 19, 2, 1, 80, 24), (1, 65, 33, 2, 2, 16, 16)]
    script = native_against_reference_script(sizes, ["float32", "float16", "bfloat16"]) + 'print("ok")\n'
    env = {
        **os.environ,
        "FASTLAYERS_CACHE_DIR": str(tmp_path),
        "FASTLAYERS_NATIVE_CXXFLAGS": "-fsanitize=address -fno-omit-frame-pointer",
        "LD_PRELOAD": preload,
        "ASAN_OPTIONS": "detect_leaks=0",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    report = result.stderr[result.stderr.find("ERROR: AddressSanitizer"):][:4000]
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), report or result.stderr[-4000:]


@pytest.mark.parametrize("b, t, s", [(2, 0, 5), (2, 5, 0), (0, 5, 5)])
def test_empty_axes_give_what_the_reference_gives(rng, b, t, s):
    q = tf.constant(rng.standard_normal((b, t, 4, 8)), tf.float32)
    k = tf.constant(rng.standard_normal((b, s, 2, 8)), tf.float32)
    v = tf.constant(rng.standard_normal((b, s, 2, 8)), tf.float32)
    out = kernels.dot_product_attention(q, k, v, implementation="native")
    reference = kernels.dot_product_attention(q, k, v, implementation="reference")
    assert out.shape == reference.shape == (b, t, 4, 8)
    np.testing.assert_array_equal(out.numpy(), reference.numpy())  # empty, or zeros when S = 0


def test_a_sliding_window_is_refused_by_name_and_auto_takes_the_compiled_path(rng):
    q = tf.constant(rng.standard_normal((1, 9, 2, 8)), tf.float32)
    with pytest.raises(ValueError, match=r"the native op has no sliding window \(received sliding_window=2\)"):
        kernels.dot_product_attention(q, q, q, implementation="native", sliding_window=2)
    auto = kernels.dot_product_attention(q, q, q, sliding_window=2)
    reference = kernels.dot_product_attention(q, q, q, sliding_window=2, implementation="reference")
    tolerance("float32").check(auto.numpy(), reference.numpy(), what="auto")


# --- the backward ----------------------------------------------------------------------


@pytest.fixture
def small_backward_tiles(monkeypatch):
    """Backward tiles smaller than the test lengths: several query and key blocks,
    partial ones last (24 key columns round up to 32)."""
    from fastlayers.kernels import attention as attention_lib

    monkeypatch.setattr(attention_lib, "NATIVE_BACKWARD_BLOCK_SIZES", BlockSizes(block_q=8, block_k=24))


def gradients(implementation, tensors, kwargs, weights, dtype=None):
    """The output and the gradients of ``sum(out * weights)`` with respect to query,
    key, value (and bias); ``dtype`` casts the inputs first (the float32 truth)."""
    cast = (lambda x: x) if dtype is None else (lambda x: tf.cast(x, dtype))  # noqa: E731
    sources = {name: cast(x) for name, x in tensors.items()}
    call = {key: (cast(x) if key == "bias" else x) for key, x in kwargs.items()}
    if "bias" in call:
        sources["bias"] = call.pop("bias")
    with tf.GradientTape() as tape:
        tape.watch(list(sources.values()))
        out = kernels.dot_product_attention(
            **sources, **call, block_sizes=SMALL_BLOCKS, implementation=implementation
        )
        loss = tf.reduce_sum(tf.cast(out, tf.float32) * weights)
    return out, dict(zip(sources, tape.gradient(loss, list(sources.values()))))


def check_gradients(rng, dtype, tensors, kwargs, what=""):
    """The native gradients against the reference's on the same (rounded) inputs in
    float32, with the dtype's gradient tolerance; returns the native ones."""
    out_shape = tensors["query"].shape[:3] + tensors["value"].shape[3:]
    weights = tf.constant(rng.standard_normal(out_shape), tf.float32)
    _, actual = gradients("native", tensors, kwargs, weights)
    _, expected = gradients("reference", tensors, kwargs, weights, dtype=tf.float32)
    assert set(actual) == set(expected)
    for name, grad in actual.items():
        source = tensors.get(name, kwargs.get("bias"))
        assert grad.shape == source.shape and grad.dtype == source.dtype, name
        tolerance(dtype, grad=True).check(grad.numpy(), expected[name].numpy(), what=f"{what} {dtype} d{name}")
    return actual


@pytest.mark.usefixtures("small_backward_tiles")
@pytest.mark.parametrize("case", ["causal", "padding", "bias", "gqa", "fully_masked"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_the_reference(rng, dtype, case):
    q, k, v, options = make_case(rng, case, dtype, t=29, s=41)
    tensors, kwargs = to_tensors(dtype, q, k, v, options)
    grads = check_gradients(rng, dtype, tensors, kwargs, what=case)
    if case == "fully_masked":
        np.testing.assert_array_equal(grads["query"].numpy()[:, ::5].astype(np.float64), 0.0)


@pytest.mark.usefixtures("small_backward_tiles")
@pytest.mark.parametrize("form", MASK_FORMS)
def test_backward_every_mask_and_bias_broadcast_form(rng, form):
    """The bias gradient sums over the bias's broadcast axes (several batch entries
    and key/value heads add into the same elements)."""
    b, t, s, n, kv, h = 3, 13, 21, 4, 2, 8
    q, k, v, _ = make_case(rng, "plain", "float32", b=b, t=t, s=s, n=n, kv=kv, h=h)
    shape = form_shape(form, (b, n, t, s))
    mask = rng.random(shape) > 0.3
    bias = rng.standard_normal(shape)
    tensors, _ = to_tensors("float32", q, k, v, {})
    kwargs = dict(bias=tf.constant(bias, tf.float32), mask=tf.constant(mask), is_causal=form == "BNTS")
    check_gradients(rng, "float32", tensors, kwargs, what=form)


@pytest.mark.parametrize(
    "t, s, h, d, causal",
    [
        (1, 1, 8, 8, False),
        (1, 203, 40, 40, True),
        (113, 203, 40, 40, False),
        (113, 203, 80, 80, True),
        (203, 113, 80, 24, True),
    ],
)
def test_backward_awkward_sizes_with_the_default_tiles(rng, t, s, h, d, causal):
    q, k, v, _ = make_case(rng, "gqa", "float32", b=1, t=t, s=s, n=4, h=h, d=d)
    tensors, _ = to_tensors("float32", q, k, v, {})
    check_gradients(rng, "float32", tensors, dict(is_causal=causal))


@pytest.mark.usefixtures("small_backward_tiles")
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_dropout_drops_the_reference_positions(rng, dtype):
    q, k, v, options = make_case(rng, "bias", dtype, t=29, s=41, kv=2)
    tensors, kwargs = to_tensors(dtype, q, k, v, options)
    kwargs.update(is_causal=True, dropout_rate=0.3, seed=[5, 9])
    check_gradients(rng, dtype, tensors, kwargs, what="dropout")


@pytest.mark.usefixtures("small_backward_tiles")
@pytest.mark.parametrize("variant", ["keys", "rows"])
def test_backward_nan_in_hidden_positions_reaches_nothing(rng, variant):
    b, t, s, n, h = 2, 11, 29, 4, 8
    q, k, v, _ = make_case(rng, "gqa", "float32", b=b, t=t, s=s, n=n, h=h)
    mask = np.ones((b, 1, t, s), bool)
    mask[:, :, :, 20:] = False  # keys 20.. hidden from every row
    if variant == "rows":
        mask[:, :, 7:, :] = False  # query rows 7.. see no key
    weights = tf.constant(rng.standard_normal((b, t, n, h)), tf.float32)
    clean, _ = to_tensors("float32", q, k, v, {})
    _, expected = gradients("reference", clean, dict(mask=tf.constant(mask)), weights)
    q_bad, k_bad, v_bad = q.copy(), k.copy(), v.copy()
    k_bad[:, 20:] = np.nan
    v_bad[:, 20:] = np.inf
    if variant == "rows":
        q_bad[:, 7:] = np.nan
    bad, _ = to_tensors("float32", q_bad, k_bad, v_bad, {})
    _, actual = gradients("native", bad, dict(mask=tf.constant(mask)), weights)
    for name in ("query", "key", "value"):
        assert np.isfinite(actual[name].numpy()).all(), name
        tolerance("float32", grad=True).check(actual[name].numpy(), expected[name].numpy(), what=f"d{name}")
    np.testing.assert_array_equal(actual["key"].numpy()[:, 20:], 0.0)
    np.testing.assert_array_equal(actual["value"].numpy()[:, 20:], 0.0)
    if variant == "rows":
        np.testing.assert_array_equal(actual["query"].numpy()[:, 7:], 0.0)


@pytest.mark.parametrize("b, t, s", [(2, 0, 5), (2, 5, 0), (0, 5, 5)])
def test_backward_empty_axes_give_what_the_reference_gives(rng, b, t, s):
    q, k, v, _ = make_case(rng, "gqa", "float32", b=b, t=t, s=s)
    tensors, _ = to_tensors("float32", q, k, v, {})
    bias = tf.constant(rng.standard_normal((1, 4, t, s)), tf.float32)
    weights = tf.ones([b, t, 4, 8])
    _, actual = gradients("native", tensors, dict(bias=bias), weights)
    _, expected = gradients("reference", tensors, dict(bias=bias), weights)
    for name, grad in expected.items():
        assert actual[name].shape == grad.shape, name
        np.testing.assert_array_equal(actual[name].numpy(), grad.numpy())  # empty, or zeros


def raw_backward(q, k, v, out, lse, d_out, *, bias=None, mask=None, scale=None, **attrs):
    """The backward op itself: ``(d_query, d_key, d_value, d_bias)``."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    return library().fastlayers_attention_backward(
        q, k, v,
        tf.zeros([0, 0, 0, 0]) if bias is None else bias,
        tf.zeros([0, 0, 0, 0], tf.bool) if mask is None else mask,
        tf.zeros([0], tf.uint32),
        out, lse, d_out,
        scale=scale, has_bias=bias is not None, has_mask=mask is not None, **attrs,
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["plain", "bias", "causal", "padding"])
def test_backward_portable_primitives_match_the_vectorised_ones(rng, case, dtype):
    q, k, v, options = make_case(rng, case, dtype, t=21, s=45, h=40)
    tensors, kwargs = to_tensors(dtype, q, k, v, options)
    args = dict(
        bias=tf.cast(kwargs["bias"], tf.float32) if "bias" in kwargs else None,
        mask=kwargs.get("mask"),
        is_causal=kwargs.get("is_causal", False),
    )
    out, lse = raw_forward(*tensors.values(), **args)
    d_out = tf.constant(rng.standard_normal(out.shape), dtype)
    best = raw_backward(*tensors.values(), out, lse, d_out, **args, block_q=8, block_k=16)
    portable = raw_backward(*tensors.values(), out, lse, d_out, **args, block_q=8, block_k=16, isa="portable")
    for name, x, y in zip(("query", "key", "value", "bias"), best, portable):
        tolerance(dtype, grad=True).check(x.numpy(), y.numpy(), what=f"best vs portable d{name}")


def test_backward_bias_slots_past_the_budget_run_in_turn(rng):
    """With too little memory for one bias-gradient slot per colliding item, the
    items share slots in turn: the same gradient."""
    q, k, v, _ = make_case(rng, "gqa", "float32", b=3, t=19, s=23)
    tensors, _ = to_tensors("float32", q, k, v, {})
    bias = tf.constant(rng.standard_normal((1, 1, 19, 23)), tf.float32)
    out, lse = raw_forward(*tensors.values(), bias=bias)
    d_out = tf.constant(rng.standard_normal(out.shape), tf.float32)
    roomy = raw_backward(*tensors.values(), out, lse, d_out, bias=bias)
    tight = raw_backward(*tensors.values(), out, lse, d_out, bias=bias, bias_slot_bytes=2 * 19 * 23 * 4)
    for name, x, y in zip(("query", "key", "value", "bias"), tight, roomy):
        tolerance("float32", grad=True).check(x.numpy(), y.numpy(), what=f"d{name}")


def test_backward_op_checks_the_saved_forward():
    q = tf.ones([1, 4, 2, 8])
    out, lse = raw_forward(q, q, q)
    expected = (
        r"output and d_output must have shape \[B, T, N, D\] = \[1,4,2,8\] and logsumexp "
        r"\[B, N, T\] = \[1,2,4\]. Received: output.shape=\[1,4,2,8\], d_output.shape=\[1,4,2,8\], "
        r"logsumexp.shape=\[1,4,2\]"
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
        raw_backward(q, q, q, out, tf.transpose(lse, [0, 2, 1]), out)


THREAD_SCRIPT = textwrap.dedent(
    """
    import sys

    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
    from fastlayers import kernels

    case = np.load(sys.argv[2])
    results = {}
    q, k, v = (tf.constant(case[f"forward_{x}"], tf.float32) for x in "qkv")
    results["forward"] = kernels.dot_product_attention(
        q, k, v, mask=tf.constant(case["forward_mask"]), is_causal=True,
        block_sizes=kernels.BlockSizes(16, 32), implementation="native").numpy()
    for name in ("bias", "chunks"):
        inputs = [tf.constant(case[f"{name}_{x}"], tf.float32) for x in "qkv"]
        bias = tf.constant(case["bias_bias"], tf.float32) if name == "bias" else None
        inputs += [] if bias is None else [bias]
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out = kernels.dot_product_attention(
                *inputs[:3], bias=bias, mask=tf.constant(case[f"{name}_mask"]), is_causal=True,
                dropout_rate=0.2, seed=3, implementation="native")
            loss = tf.reduce_sum(out * out)
        for i, g in enumerate(tape.gradient(loss, inputs)):
            results[f"{name}_{i}"] = g.numpy()
    np.savez(sys.argv[3], **results)
    """
)


@pytest.fixture(scope="module")
def thread_runs(tmp_path_factory):
    """The forward, and the gradients with a bias broadcast over batch and heads (its
    gradient in slots) and without, with one batch entry and key/value head (key
    blocks in chunks), each computed in a process with one and with two intra-op
    threads: the case's arrays and ``{threads: results}``."""
    rng = np.random.default_rng(20261201)
    directory = tmp_path_factory.mktemp("threads")
    q, k, v, options = make_case(rng, "fully_masked", "float32", b=2, t=150, s=130, n=4, kv=2, h=16)
    case = {"forward_q": q, "forward_k": k, "forward_v": v, "forward_mask": options["mask"]}
    for name, b, kv in (("bias", 2, 2), ("chunks", 1, 1)):
        q, k, v, options = make_case(rng, "fully_masked", "float32", b=b, t=150, s=290, n=4, kv=kv, h=16)
        case.update({f"{name}_q": q, f"{name}_k": k, f"{name}_v": v, f"{name}_mask": options["mask"]})
    case["bias_bias"] = rng.standard_normal((1, 1, 150, 290))
    np.savez(directory / "case.npz", **case)
    runs = {}
    for threads in (1, 2):
        path = directory / f"results{threads}.npz"
        subprocess.run([sys.executable, "-c", THREAD_SCRIPT, str(threads), str(directory / "case.npz"), str(path)],
                       check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True)
        with np.load(path) as results:
            runs[threads] = {name: results[name] for name in results.files}
    return case, runs


def test_one_and_two_threads_give_identical_outputs(thread_runs):
    case, runs = thread_runs
    np.testing.assert_array_equal(runs[1]["forward"], runs[2]["forward"])
    expected = attention_oracle(case["forward_q"], case["forward_k"], case["forward_v"],
                                mask=case["forward_mask"], is_causal=True)
    tolerance("float32").check(runs[1]["forward"], expected)


def test_backward_one_and_two_threads_give_identical_gradients(thread_runs):
    _, runs = thread_runs
    gradients = sorted(name for name in runs[1] if name != "forward")
    assert gradients == ["bias_0", "bias_1", "bias_2", "bias_3", "chunks_0", "chunks_1", "chunks_2"]
    for name in gradients:
        np.testing.assert_array_equal(runs[1][name], runs[2][name], err_msg=name)
        assert np.isfinite(runs[1][name]).all() and np.abs(runs[1][name]).max() > 0, name


class TestSecondOrder:
    """The native backward has no gradient: differentiating it raises, naming the paths that have one."""

    message = r"implementation='native' of dot_product_attention has no second-order gradient"

    def inputs(self):
        rng = np.random.default_rng(1)
        return [tf.constant(rng.standard_normal((1, 5, 2, 8)), tf.float32) for _ in range(3)]

    def test_nested_tapes(self):
        inputs = self.inputs()
        with tf.GradientTape() as outer:
            outer.watch(inputs)
            with tf.GradientTape() as inner:
                inner.watch(inputs)
                loss = tf.reduce_sum(kernels.dot_product_attention(*inputs, implementation="native") ** 2)
            d_query = inner.gradient(loss, inputs[0])
        with pytest.raises(NotImplementedError, match=self.message + r".*Pass implementation='graph' or 'reference'"):
            outer.gradient(d_query, inputs)

    def test_tf_gradients_twice(self):
        @tf.function
        def twice(q, k, v):
            loss = tf.reduce_sum(kernels.dot_product_attention(q, k, v, implementation="native") ** 2)
            d_query = tf.gradients(loss, q)[0]
            return tf.gradients(tf.reduce_sum(d_query), [q, k, v])

        with pytest.raises(NotImplementedError, match=self.message):
            twice(*self.inputs())


def test_calls_running_at_the_same_time_give_the_outputs_of_calls_one_by_one(rng):
    """The forward keeps its key/value panels in one buffer between calls; a call that
    finds it in use packs into its own."""
    import concurrent.futures

    cases = [make_case(rng, "gqa", "float32", b=2, t=60 + 7 * i, s=90 + 5 * i) for i in range(4)]
    inputs = [to_tensors("float32", q, k, v, options) for q, k, v, options in cases]
    one_by_one = [native(**tensors, **kwargs).numpy() for tensors, kwargs in inputs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            futures = [pool.submit(lambda t=t, kw=kw: native(**t, **kw).numpy()) for t, kw in inputs]
            for future, expected in zip(futures, one_by_one):
                np.testing.assert_array_equal(future.result(), expected)
    # and two ops of one graph, which TensorFlow may run side by side
    both = tf.function(lambda: [native(**t, **kw) for t, kw in inputs[:2]])()
    for got, expected in zip(both, one_by_one[:2]):
        np.testing.assert_array_equal(got.numpy(), expected)
