"""The native ops' AVX-512 and AMX primitives, run on any CPU: the library built
against SIMDe's portable versions of the AVX-512 intrinsics and plain loops for AMX's
(``-DFASTLAYERS_EMULATE_AVX512``, ``isa.h``), in processes of their own, where "best"
is AMX. Their results are
compared with the portable primitives of the same library and with the reference,
forward and backward, on sizes that reach every micro-tile shape (12-row tiles and
the rows left over, panel pairs and a single panel last). The int8 Dense op's
AVX512-VNNI micro-kernel is compared bit for bit with the portable and AVX2 ones
(which run natively in that library too)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import simde_py
from attention_cases import native_against_reference_script

# -O1: the emulated kernels only need to be right, and SIMDe compiles a third faster so.
EMULATED_FLAGS = f"-DFASTLAYERS_EMULATE_AVX512 -I{simde_py.get_include()} -Wno-psabi -O1"
TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def emulated_env(tmp_path_factory):
    """The environment of a process that builds (once for the module) and loads the
    emulated library."""
    return {
        **os.environ,
        "FASTLAYERS_CACHE_DIR": str(tmp_path_factory.mktemp("emulated-avx512")),
        "FASTLAYERS_NATIVE_CXXFLAGS": EMULATED_FLAGS,
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }


def run(script, env, *args):
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-3000:] + result.stderr[-4000:]
    return result.stdout


# (b, t, s, n, kv, h, d): T=13 is one 12-row tile and a row left over; S=203 pads to
# 13 panels (six pairs and one); head dims 40 and 80 end on a single panel.
SIZES = [(1, 1, 1, 1, 1, 8, 8), (2, 13, 203, 4, 2, 40, 40), (1, 113, 19, 2, 1, 80, 24), (1, 70, 150, 2, 2, 64, 64)]

ATTENTION_SCRIPT = native_against_reference_script(SIZES, ["float32", "bfloat16"]) + f"SIZES = {SIZES!r}\n" + """
from fastlayers.kernels.native import attention as native_attention

available, isa = native_attention.build_status()
assert (available, isa) == (True, "amx"), (available, isa)
library = native_attention.load_library()
none_f, none_b = tf.zeros([0, 0, 0, 0]), tf.zeros([0, 0, 0, 0], tf.bool)

def raw(q, k, v, bias, mask, isa, **attrs):
    '''The forward and backward ops with one ISA's primitives.'''
    scale = float(1 / np.sqrt(q.shape[-1]))
    flags = dict(scale=scale, has_bias=bias is not None, has_mask=mask is not None, isa=isa, **attrs)
    b = none_f if bias is None else bias
    m = none_b if mask is None else mask
    seed = tf.zeros([0], tf.uint32)
    out, lse = library.fastlayers_attention_forward(q, k, v, b, m, seed, **flags)
    d_out = tf.constant(np.cos(np.arange(np.prod(out.shape))).reshape(out.shape), out.dtype)
    grads = library.fastlayers_attention_backward(q, k, v, b, m, seed, out, lse, d_out, **flags)
    return [out, lse, *grads]

# The same ops with each AVX-512 or AMX table and with the portable one: the same
# numbers up to rounding.
for (b, t, s, n, kv, h, d) in SIZES:
    for dtype in (tf.float32, tf.bfloat16):
        q = tf.constant(rng.standard_normal((b, t, n, h)), dtype)
        k = tf.constant(rng.standard_normal((b, s, kv, h)), dtype)
        v = tf.constant(rng.standard_normal((b, s, kv, d)), dtype)
        mask = tf.constant(rng.random((b, 1, t, s)) > 0.3)
        bias = tf.constant(rng.standard_normal((1, n, 1, s)), dtype)
        bias32 = tf.cast(bias, tf.float32)
        for bias_in, mask_in, attrs in ((None, None, {}), (bias32, mask, dict(is_causal=True)),
                                        (None, mask[..., :1, :], dict(block_q=5, block_k=40))):
            slow = raw(q, k, v, bias_in, mask_in, "portable", **attrs)
            for isa in ("amx", "avx512bf16", "avx512"):
                fast = raw(q, k, v, bias_in, mask_in, isa, **attrs)
                for name, x, y in zip(("output", "logsumexp", "dq", "dk", "dv", "dbias"), fast, slow):
                    kernels.tolerance(dtype, grad=name.startswith("d")).check(
                        x.numpy(), y.numpy(), what=f"{isa} vs portable {name} {(b, t, s, n, kv, h, d)} {attrs}")

# Causal blocks of 5 rows end at odd key counts: the key right past a block (here
# position 5, a NaN) is half of a pair of keys that block multiplies, and must
# reach none of its rows.
for dtype in (tf.float32, tf.bfloat16):
    q, k = (tf.constant(rng.standard_normal((1, 20, 2, 16)), dtype) for _ in range(2))
    v = rng.standard_normal((1, 20, 2, 16))
    clean = tf.constant(v, dtype)
    v[:, 5] = np.nan
    v = tf.constant(v, dtype)
    out = kernels.dot_product_attention(q, k, v, is_causal=True, implementation="native",
                                        block_sizes=kernels.BlockSizes(5, 32)).numpy().astype(np.float32)
    # (The reference multiplies the NaN by a zero probability: compared on clean values.)
    expected = kernels.dot_product_attention(q, k, clean, is_causal=True, implementation="reference").numpy()
    assert np.isfinite(out[:, :5]).all() and np.isnan(out[:, 5:]).all(), dtype
    kernels.tolerance(dtype).check(out[:, :5], expected[:, :5].astype(np.float32))
print("ok")
"""


def test_attention_primitives_match_the_portable_ones_and_the_reference(emulated_env):
    run(ATTENTION_SCRIPT, emulated_env)


DENSE_INT8_SCRIPT = """
import itertools
import numpy as np, tensorflow as tf
from fastlayers.kernels.native import dense_int8

assert dense_int8.isa() == "avx512vnni", dense_int8.isa()
library = dense_int8.load_library()
rng = np.random.default_rng(0)

def run(x, kernel_q, kernel_scale, bias, relu, isa):
    return library.fastlayers_dense_int8(
        x, kernel_q, kernel_scale, tf.zeros([0]) if bias is None else bias, epsilon=1e-7,
        activation="relu" if relu else "linear", has_bias=bias is not None, isa=isa).numpy()

# Keras's int8 Dense without bias, each float32 step as TensorFlow rounds it.
def oracle(x, kernel_q, kernel_scale):
    f32 = np.float32
    scale = f32(127) / (np.abs(x).max(axis=-1, keepdims=True) + f32(1e-7))
    x_q = np.clip(np.round(x * scale), -127, 127).astype(np.int64)
    return (x_q @ kernel_q.astype(np.int64)).astype(f32) / (kernel_scale * scale)

def check(x, kernel_q, kernel_scale, bias, what):
    for with_bias, relu in itertools.product((False, True), (False, True)):
        args = (x, kernel_q, kernel_scale, bias if with_bias else None, relu)
        fast = run(*args, "avx512vnni")
        for other in ("portable", "avx2"):
            np.testing.assert_array_equal(fast, run(*args, other),
                                          err_msg=f"avx512vnni vs {other} {what} bias={with_bias} relu={relu}")

# M: one row panel (1), two (5), three (11), four (13), four and two (21), and past
# one 96-row tile (101); K: quad tails (1, 5), one quad (4), one feature block of 256
# quads or less (255), two (1027) and five (4099, a tail of 3); N: one unit, a panel of
# 16 units, a panel and a tail, six and a tail, and past one 256-unit tile (300).
shapes = list(itertools.product((1, 5, 11, 13, 21), (1, 4, 5, 255, 4099), (1, 16, 17, 100)))
shapes += [(13, 1027, 40)]
shapes += [(101, 1027, 300), (101, 4, 17)]
for m, k, n in shapes:
    x = rng.standard_normal((m, k)).astype(np.float32)
    kernel_q = rng.integers(-128, 128, (k, n)).astype(np.int8)
    kernel_scale = rng.uniform(0.5, 200.0, n).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    check(x, kernel_q, kernel_scale, bias, (m, k, n))

# Extreme operands: inputs that quantize to ±127 everywhere, kernels of ±127 and -128
# (and some zeros) with mixed signs, so every product has its largest magnitude and a
# wrong sign or a saturated sum shows; against the int64 oracle too.
for m, k, n in [(13, 4099, 40), (5, 1027, 17), (21, 255, 100), (3, 5, 16)]:
    x = rng.choice(np.float32([-1.0, 1.0]), (m, k))
    x[0], x[1] = 1.0, -1.0
    kernel_q = rng.choice(np.int8([-128, -127, 127]), (k, n))
    kernel_q[:, 0], kernel_q[:, 1], kernel_q[:, 2] = 127, -127, -128
    kernel_q[:, 3] = np.where(x[2] > 0, -128, 127)  # row 2 · unit 3: all negative
    kernel_q[1::2, 4] = 0
    kernel_scale = np.ones(n, np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    check(x, kernel_q, kernel_scale, bias, ("extreme", m, k, n))
    np.testing.assert_array_equal(run(x, kernel_q, kernel_scale, None, False, "avx512vnni"),
                                  oracle(x, kernel_q, kernel_scale), err_msg=f"oracle {(m, k, n)}")
print("ok")
"""


def test_dense_int8_vnni_sums_match_the_portable_and_avx2_ones(emulated_env):
    run(DENSE_INT8_SCRIPT, emulated_env)


@pytest.mark.slow
def test_the_native_attention_tests_pass_on_the_emulated_build(emulated_env):
    """Every test of the native attention op, with AVX-512 as the best ISA."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "kernels" / "test_native_attention.py")],
        env=emulated_env, capture_output=True, text=True, cwd=TESTS.parent,
    )
    assert result.returncode == 0, result.stdout[-6000:]
