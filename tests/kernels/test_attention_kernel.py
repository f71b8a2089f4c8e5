"""kernels.dot_product_attention against a float64 numpy oracle, its gradients against
the reference's, dropout, awkward lengths, and bad input."""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from attention_cases import SMALL_BLOCKS, check_gradients_match_reference, loss_and_grads, make_case, to_tensors
from helpers import IMPLEMENTATIONS, pairwise
from oracles import attention_oracle

from fastlayers import kernels
from fastlayers.kernels import BlockSizes, tolerance

DTYPES = ("float32", "float16", "bfloat16")


def numpy_cases():
    """Every pair of implementation, dtype and case values by default, the product
    with -m slow; XLA's half precision (a program per case and dtype, the slowest to
    compile) only with -m slow."""
    for param in pairwise(IMPLEMENTATIONS, DTYPES, ["causal", "padding", "bias", "gqa", "fully_masked"]):
        implementation, dtype, _ = param.values
        slow = implementation == "xla" and dtype != "float32"
        yield pytest.param(*param.values, id=param.id,
                           marks=[*param.marks, pytest.mark.slow] if slow else param.marks)


@pytest.mark.parametrize("implementation, dtype, case", list(numpy_cases()))
def test_matches_numpy(rng, implementation, dtype, case):
    q, k, v, options = make_case(rng, case, dtype)
    tensors, kwargs = to_tensors(dtype, q, k, v, options)
    out = kernels.dot_product_attention(
        **tensors, **kwargs, block_sizes=SMALL_BLOCKS, implementation=implementation
    )
    assert out.dtype == tf.as_dtype(dtype)
    assert out.shape == (2, 37, 4, 8)
    expected = attention_oracle(q, k, v, **options)
    assert not np.isnan(out.numpy().astype(np.float64)).any()
    tolerance(dtype).check(out.numpy(), expected, what=f"{implementation} {dtype} {case}")
    if case == "fully_masked":
        # Query rows 0, 5, 10, ... see no key: exactly zero, in every dtype.
        np.testing.assert_array_equal(out.numpy()[:, ::5].astype(np.float64), 0.0)


def gradient_cases():
    """Every case in float32 on one compiled path or both; the rest of the sweep
    (XLA compiles a forward and a backward per case) and bfloat16 are slow."""
    for implementation in ("graph", "xla"):
        for case in ("causal", "padding", "bias", "gqa", "fully_masked"):
            fast = case in (("causal", "padding", "bias", "fully_masked") if implementation == "graph"
                            else ("causal", "gqa", "fully_masked"))
            yield pytest.param(
                implementation, "float32", case, marks=() if fast else (pytest.mark.slow,)
            )
            fast = implementation == "xla" and case == "fully_masked"
            marks = () if fast else (pytest.mark.slow,)
            yield pytest.param(implementation, "bfloat16", case, marks=marks)


@pytest.mark.parametrize("implementation, dtype, case", list(gradient_cases()))
def test_gradients_match_reference(rng, implementation, dtype, case):
    q, k, v, options = make_case(rng, case, dtype, t=29, s=41)
    tensors, kwargs = to_tensors(dtype, q, k, v, options)
    weights = tf.constant(rng.standard_normal((2, 29, 4, 8)), tf.float32)
    _, expected = loss_and_grads("reference", tensors, kwargs, weights)
    _, actual = loss_and_grads(implementation, tensors, kwargs, weights)
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype
        got = actual[name].numpy().astype(np.float64)
        assert not np.isnan(got).any(), name
        tolerance(dtype, grad=True).check(
            got, expected[name].numpy().astype(np.float64), what=f"d{name}"
        )


@pytest.mark.parametrize("implementation", ["graph", "xla"])
@pytest.mark.parametrize("bias_shape", [(1, 4, 29, 41), (2, 1, 1, 41)], ids=["1NTS", "B11S"])
def test_grouped_query_gradients_with_a_bias(rng, implementation, bias_shape):
    q, k, v, options = make_case(rng, "gqa", "float32", t=29, s=41)
    assert (q.shape[2], k.shape[2]) == (4, 2)
    options["bias"] = rng.standard_normal(bias_shape)
    tensors, kwargs = to_tensors("float32", q, k, v, options)
    weights = tf.constant(rng.standard_normal((2, 29, 4, 8)), tf.float32)
    check_gradients_match_reference(implementation, tensors, kwargs, weights)


FORMS = ["".join(form) for form in itertools.product("B1", "N1", "T1", "S1")]


def form_shape(form, full):
    """``full`` [B, N, T, S] with the axes ``form`` writes as 1 (e.g. "B11S") at size 1."""
    return tuple(1 if letter == "1" else size for letter, size in zip(form, full))


def mask_and_bias_forms():
    """Every form [B|1, N|1, T|1, S|1] of the mask, with the bias in the complementary
    form, so the 16 cases hold every form of both. Two run by default, with biases
    that vary along S: a bias constant along S shifts whole softmax rows, which
    changes nothing, so its gradient is zero."""
    for form in FORMS:
        bias_form = "".join("BNTS"[axis] if letter == "1" else "1" for axis, letter in enumerate(form))
        marks = () if form in ("BN11", "B1T1") else (pytest.mark.slow,)
        yield pytest.param(form, bias_form, id=f"mask {form}, bias {bias_form}", marks=marks)


@pytest.mark.parametrize("implementation", ["graph", "xla"])
@pytest.mark.parametrize("mask_form, bias_form", list(mask_and_bias_forms()))
def test_gradients_with_every_broadcast_form(rng, implementation, mask_form, bias_form):
    full = (b, n, t, s) = (2, 4, 11, 13)
    q, k, v, options = make_case(rng, "gqa", "float32", b=b, t=t, s=s, n=n, h=4)
    mask = rng.random(form_shape(mask_form, full)) < 0.7
    if "T" in mask_form:
        mask[..., 3, :] = False  # a query row that sees no key
    options.update(mask=mask, bias=rng.standard_normal(form_shape(bias_form, full)))
    tensors, kwargs = to_tensors("float32", q, k, v, options)
    weights = tf.constant(rng.standard_normal((b, t, n, 4)), tf.float32)
    check_gradients_match_reference(implementation, tensors, kwargs, weights, BlockSizes(4, 5))


def test_reference_gradient_matches_finite_differences(rng):
    q, k, v, options = make_case(rng, "bias", "float64", b=1, t=3, s=4, n=2, kv=2, h=2)
    options["mask"] = np.array([True, True, False, True])
    tensors, kwargs = to_tensors("float64", q, k, v, options)
    args = [tensors["query"], tensors["key"], tensors["value"], kwargs["bias"]]

    def f(query, key, value, bias):
        return kernels.dot_product_attention(
            query, key, value, bias, kwargs["mask"], implementation="reference"
        )

    theoretical, numerical = tf.test.compute_gradient(f, args)
    for got, want in zip(theoretical, numerical):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("implementation", ["reference", "graph", "xla"])
@pytest.mark.parametrize(
    "t, s, block_sizes, causal_options",
    [
        (1, 203, None, (False,)),
        (113, 203, None, (True,)),
        (113, 203, SMALL_BLOCKS, (False, True)),
        (1023, 1023, None, (True,)),
        (1, 1, None, (False,)),
    ],
)
def test_awkward_lengths(rng, implementation, t, s, block_sizes, causal_options):
    q = rng.standard_normal((1, t, 2, 16))
    k = rng.standard_normal((1, s, 1, 16))
    v = rng.standard_normal((1, s, 1, 16))
    for is_causal in causal_options:
        out = kernels.dot_product_attention(
            tf.constant(q, tf.float32),
            tf.constant(k, tf.float32),
            tf.constant(v, tf.float32),
            is_causal=is_causal,
            block_sizes=block_sizes,
            implementation=implementation,
        )
        expected = attention_oracle(q, k, v, is_causal=is_causal)
        tolerance("float32").check(out.numpy(), expected, what=f"T={t} S={s} causal={is_causal}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_masks_are_safe_in_half_precision(dtype):
    """Large logits next to masked keys: no overflow to inf, no NaN."""
    q = tf.fill([1, 4, 1, 8], tf.constant(30.0, dtype))
    k = tf.fill([1, 6, 1, 8], tf.constant(30.0, dtype))
    v = tf.ones([1, 6, 1, 8], dtype)
    mask = tf.constant([[False, True, True, False, True, False]])
    for implementation in ("reference", "xla"):
        out = kernels.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
        np.testing.assert_allclose(out.numpy().astype(np.float32), 1.0)


class TestDropout:
    def run(self, implementation, seed, rate=0.4, block_sizes=SMALL_BLOCKS, t=29, s=41):
        rng = np.random.default_rng(7)
        q, k, v = (
            tf.constant(rng.standard_normal(shape), tf.float32)
            for shape in ((2, t, 4, 8), (2, s, 2, 8), (2, s, 2, 8))
        )
        return kernels.dot_product_attention(
            q, k, v, is_causal=True, dropout_rate=rate, seed=seed,
            block_sizes=block_sizes, implementation=implementation,
        )

    @pytest.mark.parametrize("implementation", ["graph", "xla"])
    def test_same_keep_mask_as_reference(self, implementation):
        expected = self.run("reference", seed=3)
        tolerance("float32").check(self.run(implementation, seed=3).numpy(), expected.numpy())
        if implementation == "graph":  # the mask does not depend on the tiling
            other_blocks = self.run(implementation, seed=3, block_sizes=BlockSizes(8, 64))
            tolerance("float32").check(other_blocks.numpy(), expected.numpy())

    def test_reproducible_and_seed_dependent(self):
        a = self.run("xla", seed=11).numpy()
        np.testing.assert_array_equal(a, self.run("xla", seed=11).numpy())
        np.testing.assert_array_equal(a, self.run("xla", seed=tf.constant(11)).numpy())
        assert np.abs(a - self.run("xla", seed=12).numpy()).max() > 1e-2
        assert np.abs(a - self.run("xla", seed=[11, 1]).numpy()).max() > 1e-2

    def test_drops_the_requested_fraction(self):
        # With V = identity-like one-hot values, each output entry is one probability.
        s = 64
        q = tf.zeros([1, 64, 1, 4])
        k = tf.zeros([1, s, 1, 4])
        v = tf.reshape(tf.eye(s), [1, s, 1, s])
        out = kernels.dot_product_attention(
            q, k, v, dropout_rate=0.25, seed=5, implementation="graph"
        ).numpy()
        kept = out > 0
        assert abs(kept.mean() - 0.75) < 0.03
        np.testing.assert_allclose(out[kept], 1.0 / s / 0.75, rtol=1e-5)

    @pytest.mark.parametrize(
        "implementation", ["graph", pytest.param("xla", marks=pytest.mark.slow)]
    )
    def test_gradients_match_reference(self, rng, implementation):
        q, k, v, options = make_case(rng, "bias", "float32", t=20, s=30)
        options.update(dropout_rate=0.3, seed=9)
        tensors, kwargs = to_tensors("float32", q, k, v, options)
        weights = tf.constant(rng.standard_normal((2, 20, 4, 8)), tf.float32)
        _, expected = loss_and_grads("reference", tensors, kwargs, weights)
        _, actual = loss_and_grads(implementation, tensors, kwargs, weights)
        for name in expected:
            tolerance("float32", grad=True).check(actual[name], expected[name], what=f"d{name}")

    @pytest.mark.parametrize("implementation", ["graph", "xla"])
    def test_gradients_with_a_batch_of_one(self, rng, implementation):
        """In a tf.function the batch of one is static, as on every XLA call."""
        q, k, v, options = make_case(rng, "bias", "float32", b=1, t=20, s=30)
        options.update(dropout_rate=0.3, seed=9)
        tensors, kwargs = to_tensors("float32", q, k, v, options)
        weights = tf.constant(rng.standard_normal((1, 20, 4, 8)), tf.float32)
        _, expected = loss_and_grads("reference", tensors, kwargs, weights)
        actual = tf.function(lambda: loss_and_grads(implementation, tensors, kwargs, weights)[1])()
        for name in expected:
            tolerance("float32", grad=True).check(actual[name], expected[name], what=f"d{name}")


def test_inside_a_function_with_unknown_batch_and_length(rng):
    q = rng.standard_normal((2, 21, 2, 8)).astype(np.float32)
    spec = tf.TensorSpec([None, None, 2, 8], tf.float32)

    @tf.function(input_signature=[spec])
    def attend(x):
        return kernels.dot_product_attention(
            x, x, x, is_causal=True, block_sizes=SMALL_BLOCKS, implementation="graph"
        )

    tolerance("float32").check(attend(q).numpy(), attention_oracle(q, q, q, is_causal=True))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("heads_at_run_time", [1, 4])
def test_mask_and_bias_with_a_head_axis_unknown_when_traced(rng, implementation, heads_at_run_time):
    """A mask or bias traced as [B, None, T, S] takes the head axis it has when called
    (1 broadcasts, N is per head) in every implementation."""
    q, k, v, options = make_case(rng, "gqa", "float32", b=2, t=9, s=11, n=4, kv=2, h=8)
    mask = rng.random((2, heads_at_run_time, 9, 11)) > 0.3
    bias = rng.standard_normal((2, heads_at_run_time, 9, 11))
    tensors, kwargs = to_tensors("float32", q, k, v, {"mask": mask, "bias": bias})

    @tf.function(input_signature=[
        tf.TensorSpec([2, None, 9, 11], tf.bool), tf.TensorSpec([2, None, 9, 11], tf.float32)
    ])
    def attend(mask, bias):
        return kernels.dot_product_attention(
            **tensors, mask=mask, bias=bias, implementation=implementation
        )

    expected = attention_oracle(q, k, v, mask=mask, bias=bias)
    tolerance("float32").check(attend(kwargs["mask"], kwargs["bias"]).numpy(), expected,
                               what=f"{implementation} heads={heads_at_run_time}")


def check_gradients_in_a_function(rng, implementation, signature, shapes, is_causal=False):
    """Gradients of ``sum(out * cotangent)`` from a tf.function with ``signature``
    (query, key, value, bias [1, N, T, S], padding mask [B, 1, 1, S], cotangent),
    called once for each (B, T, S) in ``shapes``, against the reference's."""
    n, kv, h = 4, 2, 8

    @tf.function(input_signature=signature)
    def gradients(query, key, value, bias, mask, weights):
        with tf.GradientTape() as tape:
            tape.watch([query, key, value, bias])
            out = kernels.dot_product_attention(
                query, key, value, bias, mask, is_causal=is_causal,
                block_sizes=SMALL_BLOCKS, implementation=implementation,
            )
            loss = tf.reduce_sum(out * weights)
        return tape.gradient(loss, [query, key, value, bias])

    for b, t, s in shapes:
        q, k, v, options = make_case(rng, "padding", "float32", b=b, t=t, s=s, n=n, kv=kv, h=h)
        options.update(bias=rng.standard_normal((1, n, t, s)), is_causal=is_causal)
        tensors, kwargs = to_tensors("float32", q, k, v, options)
        weights = tf.constant(rng.standard_normal((b, t, n, h)), tf.float32)
        _, expected = loss_and_grads("reference", tensors, kwargs, weights)
        actual = gradients(*tensors.values(), kwargs["bias"], kwargs["mask"], weights)
        for name, got in zip(["query", "key", "value", "bias"], actual):
            assert got.shape == expected[name].shape, (b, t, s, name)
            tolerance("float32", grad=True).check(got, expected[name], what=f"B={b} T={t} S={s} d{name}")


def _signature(b, t, s):
    """Specs of query, key, value, bias [1, N, T, S], mask [B, 1, 1, S] and the cotangent
    for N=4, K=2, H=8, with None for the sizes left unknown."""
    return [
        tf.TensorSpec([b, t, 4, 8], tf.float32),
        tf.TensorSpec([b, s, 2, 8], tf.float32),
        tf.TensorSpec([b, s, 2, 8], tf.float32),
        tf.TensorSpec([1, 4, t, s], tf.float32),
        tf.TensorSpec([b, 1, 1, s], tf.bool),
        tf.TensorSpec([b, t, 4, 8], tf.float32),
    ]


@pytest.mark.parametrize("implementation", ["graph", "xla"])
def test_gradients_in_a_function_with_unknown_batch(rng, implementation):
    t, s = 29, 41
    check_gradients_in_a_function(rng, implementation, _signature(None, t, s), [(2, t, s), (3, t, s)])


@pytest.mark.parametrize("implementation", ["graph", "xla"])
def test_gradients_in_a_function_with_unknown_lengths(rng, implementation):
    b = 2
    # lengths that end mid-block, then whole blocks of SMALL_BLOCKS
    check_gradients_in_a_function(rng, implementation, _signature(b, None, None), [(b, 29, 41), (b, 16, 24)],
                                  is_causal=True)


@pytest.mark.parametrize("implementation", ["graph", "xla"])
def test_gradients_after_a_length_change(rng, implementation):
    """A second length retraces with relaxed shapes; loop carries must stay consistent."""
    for t in (16, 40):
        x = tf.constant(rng.standard_normal((1, t, 2, 8)), tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(
                kernels.dot_product_attention(
                    x, x, x, block_sizes=SMALL_BLOCKS, implementation=implementation
                )
            )
        assert tape.gradient(loss, x).shape == x.shape


def test_auto_picks_from_the_table():
    from fastlayers.kernels.attention import ATTENTION

    chosen = ATTENTION.select(None, platform="cpu", dtype=tf.float32).implementation
    assert chosen == ATTENTION.auto[("cpu", "*")][0]


class TestBadInput:
    def call(self, q_shape=(2, 5, 4, 8), k_shape=(2, 7, 2, 8), v_shape=(2, 7, 2, 8), **kwargs):
        return kernels.dot_product_attention(
            tf.zeros(q_shape), tf.zeros(k_shape), tf.zeros(v_shape), **kwargs
        )

    def test_mismatched_head_dims(self):
        with pytest.raises(ValueError, match=r"same head dim H.*query.shape=\(2, 5, 4, 8\), key.shape=\(2, 7, 2, 6\)"):
            self.call(k_shape=(2, 7, 2, 6))

    def test_kv_heads_must_divide_heads(self):
        with pytest.raises(ValueError, match=r"K must divide .* Received: N=4, K=3"):
            self.call(k_shape=(2, 7, 3, 8), v_shape=(2, 7, 3, 8))

    def test_mask_of_the_wrong_shape(self):
        with pytest.raises(ValueError, match=r"`mask` must be broadcastable to \[B, N, T, S\] = \[2, 4, 5, 7\]. Received: mask.shape=\(5, 6\)"):
            self.call(mask=tf.ones([5, 6], tf.bool))

    def test_bias_of_the_wrong_shape(self):
        with pytest.raises(ValueError, match=r"`bias` must be broadcastable .* Received: bias.shape=\(3, 1, 1, 1\)"):
            self.call(bias=tf.zeros([3, 1, 1, 1]))

    def test_mask_must_be_boolean(self):
        with pytest.raises(TypeError, match=r"Received: mask.dtype=int32"):
            self.call(mask=tf.ones([5, 7], tf.int32))

    def test_key_and_value_lengths(self):
        with pytest.raises(ValueError, match=r"same length S .* value.shape=\(2, 9, 2, 8\)"):
            self.call(v_shape=(2, 9, 2, 8))

    def test_rank(self):
        with pytest.raises(ValueError, match=r"`query` must have rank 4 .* Received: query.shape=\(5, 4, 8\)"):
            self.call(q_shape=(5, 4, 8))

    def test_dtype(self):
        with pytest.raises(TypeError, match=r"Received: key.dtype=float16"):
            kernels.dot_product_attention(
                tf.zeros([1, 2, 1, 4]), tf.zeros([1, 2, 1, 4], tf.float16), tf.zeros([1, 2, 1, 4])
            )

    @pytest.mark.parametrize("rate", [-0.1, 1.0, "0.5"])
    def test_dropout_rate(self, rate):
        with pytest.raises(ValueError, match=r"`dropout_rate`, expected a number in \[0, 1\)"):
            self.call(dropout_rate=rate, seed=1)

    def test_dropout_needs_a_seed(self):
        with pytest.raises(ValueError, match=r"`seed` is required .* dropout_rate=0.5, seed=None"):
            self.call(dropout_rate=0.5)

    def test_implementation(self):
        with pytest.raises(ValueError, match=r"Received: implementation='fast'"):
            self.call(implementation="fast")

    def test_block_sizes(self):
        with pytest.raises(ValueError, match=r"Received: block_q=0"):
            BlockSizes(block_q=0)


@pytest.mark.parametrize("function_first", [True, False])
def test_xla_gradients_in_a_function_and_eagerly_in_one_process(rng, function_first):
    """A gradient traced in a graph gives the XLA function a forward whose loops' state
    (TensorLists) goes to the backward; an eager tape must not reuse it, since
    TensorLists cannot leave an XLA cluster eagerly."""
    q, k, v, _ = make_case(rng, "plain", "float32", t=19, s=23)
    tensors = [tf.constant(x, tf.float32) for x in (q, k, v)]

    def gradients():
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            out = kernels.dot_product_attention(*tensors, block_sizes=SMALL_BLOCKS, implementation="xla")
        return tape.gradient(out, tensors)

    runs = [tf.function(gradients), gradients] if function_first else [gradients, tf.function(gradients)]
    first, second = ([g.numpy() for g in run()] for run in runs)
    for a, b in zip(first, second):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
