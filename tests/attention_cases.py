"""Attention inputs and gradient checks shared by the attention test modules."""

import textwrap

import numpy as np
import tensorflow as tf
from helpers import round_to

from fastlayers import kernels
from fastlayers.kernels import BlockSizes, tolerance


# Small tiles, so that the tiny test shapes still span several query and key blocks
# and end in partial (padded) blocks.
SMALL_BLOCKS = BlockSizes(block_q=16, block_k=24)


def make_case(rng, name, dtype, *, b=2, t=37, s=53, n=4, kv=4, h=8, d=None):
    """Inputs (rounded to dtype) and kernel keyword arguments for one named case."""
    if name == "gqa":
        kv = 2
    d = d or h
    q = rng.standard_normal((b, t, n, h))
    k = rng.standard_normal((b, s, kv, h))
    v = rng.standard_normal((b, s, kv, d))
    options = {}
    if name == "causal":
        options["is_causal"] = True
    elif name == "padding":
        lengths = rng.integers(1, s + 1, size=b)
        options["mask"] = (np.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
    elif name == "bias":
        options["bias"] = rng.standard_normal((1, n, t, s))
    elif name == "fully_masked":
        mask = rng.random((b, n, t, s)) > 0.3
        mask[:, :, ::5] = False  # every fifth query row sees no key at all
        options["mask"] = mask
        options["is_causal"] = True
    q, k, v = (round_to(a, dtype) for a in (q, k, v))
    if "bias" in options:
        options["bias"] = round_to(options["bias"], dtype)
    return q, k, v, options


def to_tensors(dtype, q, k, v, options):
    cast = lambda a: tf.constant(a, dtype)  # noqa: E731
    tensors = {name: cast(a) for name, a in (("query", q), ("key", k), ("value", v))}
    kwargs = dict(options)
    if "bias" in kwargs:
        kwargs["bias"] = cast(kwargs["bias"])
    if "mask" in kwargs:
        kwargs["mask"] = tf.constant(kwargs["mask"])
    return tensors, kwargs


def loss_and_grads(implementation, tensors, kwargs, weights, block_sizes=SMALL_BLOCKS):
    sources = dict(tensors)
    if "bias" in kwargs:
        sources["bias"] = kwargs["bias"]
    with tf.GradientTape() as tape:
        tape.watch(list(sources.values()))
        call = {**kwargs, **sources}
        out = kernels.dot_product_attention(
            **call, block_sizes=block_sizes, implementation=implementation
        )
        loss = tf.reduce_sum(tf.cast(out, tf.float32) * weights)
    return out, dict(zip(sources, tape.gradient(loss, list(sources.values()))))


def check_gradients_match_reference(implementation, tensors, kwargs, weights, block_sizes=SMALL_BLOCKS):
    """Output and gradients (of each input, and of the bias) against the reference's, in float32."""
    reference, expected = loss_and_grads("reference", tensors, kwargs, weights, block_sizes)
    out, actual = loss_and_grads(implementation, tensors, kwargs, weights, block_sizes)
    tolerance("float32").check(out, reference, what=f"{implementation} output")
    sources = {**tensors, **({"bias": kwargs["bias"]} if "bias" in kwargs else {})}
    assert set(actual) == set(sources)
    for name, source in sources.items():
        assert actual[name].shape == source.shape, (implementation, name)
        tolerance("float32", grad=True).check(actual[name], expected[name], what=f"{implementation} d{name}")


def native_against_reference_script(sizes, dtypes):
    """Python source that runs implementation="native" against "reference", output
    and gradients, for each (b, t, s, n, kv, h, d) of ``sizes`` and each dtype name
    of ``dtypes``, without options, masked and causal, with bias and dropout, and with
    a broadcast mask and odd tiles: for a process of its own, whose library was built
    with other flags (sanitizers, emulated ISAs). Defines ``rng`` for what follows."""
    return textwrap.dedent(
        f"""
        import numpy as np, tensorflow as tf
        from fastlayers import kernels
        rng = np.random.default_rng(0)
        for (b, t, s, n, kv, h, d) in {sizes!r}:
            for dtype in [tf.as_dtype(name) for name in {dtypes!r}]:
        """
    ) + textwrap.indent(textwrap.dedent(
        """
        q = tf.constant(rng.standard_normal((b, t, n, h)), dtype)
        k = tf.constant(rng.standard_normal((b, s, kv, h)), dtype)
        v = tf.constant(rng.standard_normal((b, s, kv, d)), dtype)
        mask = tf.constant(rng.random((b, 1, t, s)) > 0.3)
        bias = tf.constant(rng.standard_normal((1, n, 1, s)), dtype)
        for kwargs in (dict(), dict(mask=mask, is_causal=True), dict(bias=bias, dropout_rate=0.3, seed=1),
                       dict(mask=mask[..., :1, :], block_sizes=kernels.BlockSizes(7, 17))):
            what = f"{dtype.name} {(b, t, s, n, kv, h, d)} {sorted(kwargs)}"
            results = []
            for implementation in ("native", "reference"):
                inputs = [q, k, v] + ([kwargs["bias"]] if "bias" in kwargs else [])
                with tf.GradientTape() as tape:
                    tape.watch(inputs)
                    out = kernels.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
                    loss = tf.reduce_sum(tf.cast(out, tf.float32) ** 2)
                results.append([out] + tape.gradient(loss, inputs))
            kernels.tolerance(dtype).check(results[0][0].numpy(), results[1][0].numpy(), what=what)
            for grad, expected in zip(results[0][1:], results[1][1:]):
                kernels.tolerance(dtype, grad=True).check(grad.numpy(), expected.numpy(), what=what)
        """
    ), " " * 8)
