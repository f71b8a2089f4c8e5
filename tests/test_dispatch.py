"""The dispatch contract: validation, explicit requests, auto's table and fall-back."""

import pytest
import tensorflow as tf

from fastlayers.kernels import dispatch
from fastlayers.kernels.auto import AUTO, EAGER_REFERENCE_BELOW_FLOPS


def _double(x):
    return 2 * x


def _refuse_xla(implementation, *, platform, dtype):
    if implementation == "xla" and dtype == tf.float16:
        return ["float16 is refused by this test kernel"]
    return []


def _kernel(auto=None):
    return dispatch.Kernel(
        "double",
        _double,
        auto=auto or {("cpu", "*"): ("xla", "graph"), ("cpu", "float64"): ("reference",)},
        not_supported_reasons=_refuse_xla,
    )


@pytest.mark.parametrize("bad", ["fast", "XLA", "", 3])
def test_unknown_implementation_names_the_value(bad):
    with pytest.raises(ValueError, match=rf"`implementation`.*Received: implementation={bad!r}"):
        dispatch.check_implementation(bad)


@pytest.mark.parametrize("good", [None, "reference", "graph", "xla"])
def test_known_implementations_pass(good):
    assert dispatch.check_implementation(good) == good


def test_auto_takes_the_first_supported_entry_of_its_row():
    kernel = _kernel()
    assert kernel.select(None, platform="cpu", dtype=tf.float32) == "xla"
    assert kernel.select(None, platform="cpu", dtype=tf.float64) == "reference"
    # the row refuses xla for float16, so auto moves on to the row's next entry
    assert kernel.select(None, platform="cpu", dtype=tf.float16) == "graph"


def test_auto_without_a_row_prefers_compiled_paths():
    assert _kernel().candidates("gpu", tf.float32) == ("xla", "graph", "reference")


def test_explicit_unsupported_request_raises_with_reasons():
    with pytest.raises(ValueError, match="implementation='xla'.*float16 is refused by this test kernel"):
        _kernel().select("xla", platform="cpu", dtype=tf.float16)


def test_auto_with_every_candidate_refused_lists_each():
    kernel = _kernel(auto={("cpu", "*"): ("xla",)})
    with pytest.raises(ValueError, match="No implementation.*'xla': float16 is refused"):
        kernel.select(None, platform="cpu", dtype=tf.float16)


@pytest.mark.parametrize("implementation", [i for i in dispatch.IMPLEMENTATIONS if i != "native"])
def test_every_implementation_runs_the_same_function(implementation):
    x = tf.constant([1.0, -2.5, 3.0])
    y = _kernel().run(implementation, x)
    assert y.numpy().tolist() == [2.0, -5.0, 6.0]


def test_native_needs_a_native_implementation():
    kernel = _kernel()
    assert kernel.not_supported_reasons("native", platform="cpu", dtype=tf.float32) == [
        "kernel 'double' has no native implementation"
    ]
    assert "native" not in kernel.candidates("gpu", tf.float32)
    with pytest.raises(ValueError, match="Kernel 'double' has no native implementation to run."):
        kernel.run("native", tf.constant([1.0]))
    native = dispatch.Kernel("doubled", lambda x: 2 * x, auto={}, native=lambda x: x + x)
    assert native.candidates("cpu", tf.float32)[0] == "native"
    assert native.run("native", tf.constant([1.5])).numpy().tolist() == [3.0]


def test_graph_run_inside_a_graph_inlines_ops_under_the_profiler_scope():
    kernel = _kernel()

    @tf.function
    def outer(x):
        return kernel.run("graph", x)

    graph = outer.get_concrete_function(tf.TensorSpec([3], tf.float32)).graph
    names = [op.name for op in graph.get_operations()]
    assert any(name.startswith("fastlayers/double/graph/") for name in names), names


def test_cpu_platform_follows_onednn_and_bfloat16_support():
    platform = dispatch.cpu_platform()
    assert platform in dispatch.PLATFORMS
    if not dispatch.onednn_enabled():
        assert platform == "cpu"
    elif dispatch.cpu_has_native_bfloat16():
        assert platform == "cpu-onednn-bf16"
    else:
        assert platform == "cpu-onednn"


def test_platform_of_an_eager_cpu_tensor():
    with tf.device("/CPU:0"):
        x = tf.ones([2])
    assert dispatch.platform_of(x) == dispatch.cpu_platform()


@pytest.mark.parametrize(
    "platform, dtype, native",
    [
        ("gpu", tf.float16, True),
        ("gpu", tf.bfloat16, True),
        ("gpu", tf.float32, False),
        ("cpu-onednn-bf16", tf.bfloat16, True),
        ("cpu-onednn-bf16", tf.float16, False),
        ("cpu-onednn", tf.bfloat16, False),
        ("cpu", tf.bfloat16, False),
    ],
)
def test_native_low_precision_matmul_table(platform, dtype, native):
    assert dispatch.native_low_precision_matmul(platform, dtype) is native


def test_auto_table_rows_name_known_platforms_and_implementations():
    for name, row in AUTO.items():
        for (platform, dtype), preferences in row.items():
            assert platform in dispatch.PLATFORMS, (name, platform)
            assert dtype == "*" or tf.as_dtype(dtype).is_floating, (name, dtype)
            assert preferences and set(preferences) <= set(dispatch.IMPLEMENTATIONS)


def test_auto_runs_small_eager_calls_with_the_reference():
    kernel = _kernel()
    small, large = EAGER_REFERENCE_BELOW_FLOPS / 10, EAGER_REFERENCE_BELOW_FLOPS * 10
    assert kernel.select(None, platform="cpu", dtype=tf.float32, work=small) == "reference"
    assert kernel.select(None, platform="cpu", dtype=tf.float32, work=large) == "xla"
    assert kernel.select(None, platform="cpu", dtype=tf.float32) == "xla"  # work unknown
    assert kernel.select("graph", platform="cpu", dtype=tf.float32, work=small) == "graph"

    @tf.function
    def in_a_graph():
        # no call overhead inside a graph: the table decides whatever the size
        return tf.constant(kernel.select(None, platform="cpu", dtype=tf.float32, work=small))

    assert in_a_graph().numpy().decode() == "xla"


def test_dense_states_its_work_to_auto(monkeypatch):
    from fastlayers import kernels
    from fastlayers.kernels.dense import DENSE

    chosen = []
    run = DENSE.run
    monkeypatch.setattr(DENSE, "run", lambda impl, *a, **k: chosen.append(impl) or run(impl, *a, **k))
    kernels.dense(tf.ones([4, 8]), tf.ones([8, 2]))
    kernels.dense(tf.ones([1024, 512]), tf.ones([512, 512]))
    tf.function(lambda x, w: kernels.dense(x, w))(tf.ones([4, 8]), tf.ones([8, 2]))
    table_choice = DENSE.candidates(dispatch.cpu_platform(), tf.float32)[0]
    assert chosen == ["reference", table_choice, table_choice]
