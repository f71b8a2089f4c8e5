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


@pytest.mark.parametrize("good", [None, "reference", "graph", "xla", "native"])
def test_known_implementations_pass(good):
    assert dispatch.check_implementation(good) == good


def test_auto_takes_the_first_supported_entry_of_its_row():
    kernel = _kernel()
    assert kernel.select(None, platform="cpu", dtype=tf.float32).implementation == "xla"
    assert kernel.select(None, platform="cpu", dtype=tf.float64).implementation == "reference"
    # the row refuses xla for float16, so auto moves on to the row's next entry
    assert kernel.select(None, platform="cpu", dtype=tf.float16).implementation == "graph"


def test_auto_without_a_row_prefers_compiled_paths():
    assert _kernel().candidates("gpu", tf.float32) == ("xla", "graph", "reference")


def test_explicit_unsupported_request_raises_with_reasons():
    with pytest.raises(ValueError, match="implementation='xla'.*float16 is refused by this test kernel"):
        _kernel().select("xla", platform="cpu", dtype=tf.float16)


def test_auto_with_every_candidate_refused_lists_each():
    kernel = _kernel(auto={("cpu", "*"): ("xla",)})
    with pytest.raises(ValueError, match="No implementation.*'xla': float16 is refused"):
        kernel.select(None, platform="cpu", dtype=tf.float16)


@pytest.mark.parametrize("implementation", dispatch.IMPLEMENTATIONS)
def test_every_implementation_runs_the_same_function(implementation):
    x = tf.constant([1.0, -2.5, 3.0])
    y = _kernel().run(implementation, x)
    assert y.numpy().tolist() == [2.0, -5.0, 6.0]


def test_running_native_without_a_native_implementation_raises():
    kernel = _kernel()
    assert kernel.not_supported_reasons("native", platform="cpu", dtype=tf.float32) == [
        "kernel 'double' has no native implementation"
    ]
    assert "native" not in kernel.candidates("gpu", tf.float32)
    with pytest.raises(ValueError, match="Kernel 'double' has no native implementation to run."):
        kernel.run("native", tf.constant([1.0]))


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
        assert dispatch.check_auto_row(row, name)
        for (platform, dtype, *_), preferences in row.items():
            assert platform in dispatch.PLATFORMS, (name, platform)
            assert dtype == "*" or tf.as_dtype(dtype).is_floating, (name, dtype)
            assert preferences and set(preferences) <= set(dispatch.ALL_IMPLEMENTATIONS)


def test_auto_runs_small_eager_calls_with_the_reference():
    kernel = _kernel()
    small, large = EAGER_REFERENCE_BELOW_FLOPS / 10, EAGER_REFERENCE_BELOW_FLOPS * 10
    assert kernel.select(None, platform="cpu", dtype=tf.float32, work=small).implementation == "reference"
    assert kernel.select(None, platform="cpu", dtype=tf.float32, work=large).implementation == "xla"
    assert kernel.select(None, platform="cpu", dtype=tf.float32).implementation == "xla"  # work unknown
    assert kernel.select("graph", platform="cpu", dtype=tf.float32, work=small).implementation == "graph"

    @tf.function
    def in_a_graph():
        # no call overhead inside a graph: the table decides whatever the size
        return tf.constant(kernel.select(None, platform="cpu", dtype=tf.float32, work=small).implementation)

    assert in_a_graph().numpy().decode() == "xla"


def test_dense_states_its_work_to_auto(monkeypatch):
    from fastlayers import kernels
    from fastlayers.kernels.dense import DENSE

    chosen = []
    run = DENSE.run
    monkeypatch.setattr(
        DENSE, "run", lambda sel, *a, **k: chosen.append(sel.implementation) or run(sel, *a, **k)
    )
    kernels.dense(tf.ones([4, 8]), tf.ones([8, 2]))
    kernels.dense(tf.ones([1024, 512]), tf.ones([512, 512]))
    tf.function(lambda x, w: kernels.dense(x, w))(tf.ones([4, 8]), tf.ones([8, 2]))
    table_choice = DENSE.candidates(dispatch.cpu_platform(), tf.float32)[0]
    assert chosen == ["reference", table_choice, table_choice]


# --- the selection context ------------------------------------------------------


def test_every_kernel_module_declares_one_kernel_per_op_with_a_row_and_its_work():
    import importlib
    import pkgutil

    import fastlayers.kernels as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"fastlayers.kernels.{info.name}")
        for value in vars(module).values():
            if isinstance(value, dispatch.Kernel):
                found.setdefault(value.name, {})[id(value)] = value
    assert all(len(kernels) == 1 for kernels in found.values()), found
    assert set(found) == set(AUTO)  # pooling's layouts are rows of one kernel, not kernels
    for kernels in found.values():
        [kernel] = kernels.values()
        assert kernel._work is not None, f"{kernel.name} does not state its work"


def test_the_public_kernels_leave_out_the_compiled_entry_points():
    from fastlayers import kernels

    assert not [name for name in kernels.__all__ if name.endswith("_compiled")]
    assert all(hasattr(kernels, name) for name in kernels.__all__)


@pytest.mark.parametrize("call", [
    lambda k: k.exponential(tf.ones([4, 4])),
    lambda k: k.max_pool2d(tf.ones([1, 4, 4, 2])),
    lambda k: k.center_zero(tf.ones([4, 4])),
    lambda k: k.fixed_mask(tf.ones([2, 4]), [1.0, 0.0, 1.0, 0.0]),
    lambda k: k.residual_projection(tf.ones([2, 4]), tf.ones([2, 3]), tf.ones([4, 3])),
    lambda k: k.attention_pooling(tf.ones([2, 3, 4]), tf.ones([4, 1]), tf.ones([1])),
    lambda k: k.dot_product_attention(tf.ones([1, 4, 2, 8]), tf.ones([1, 4, 2, 8]), tf.ones([1, 4, 2, 8])),
], ids=["exponential", "max_pool2d", "center_zero", "fixed_mask", "residual_projection",
        "attention_pooling", "dot_product_attention"])
def test_every_built_in_kernel_runs_small_eager_calls_with_the_reference(monkeypatch, call):
    from fastlayers import kernels

    seen = []
    original = dispatch.Kernel.run

    def run(self, selection, *tensors, **options):
        seen.append(selection)
        return original(self, selection, *tensors, **options)

    monkeypatch.setattr(dispatch.Kernel, "run", run)
    call(kernels)
    assert [(s.implementation, s.source) for s in seen] == [("reference", "small eager call")]


def test_the_selection_reaches_compiled_functions_that_declare_it():
    received = []

    def compiled(x, *, selection):
        received.append(selection)
        return 2 * x

    kernel = dispatch.Kernel("declares", _double, compiled, auto={("cpu", "*"): ("graph",)})
    for implementation in ("graph", "xla"):
        kernel(tf.ones([3]), implementation=implementation)
    assert [(s.implementation, s.source) for s in received] == [("graph", "explicit"), ("xla", "explicit")]
    # the reference declares nothing and receives nothing
    assert kernel(tf.ones([3]), implementation="reference").numpy().tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(TypeError, match=r"fills in 'selection', 'layout' itself. Received options named: selection"):
        kernel(tf.ones([3]), selection=None)


def test_one_choice_from_another_source_reuses_the_trace():
    traces = []

    def compiled(x, *, selection):
        traces.append(selection.source)
        return 2 * x

    kernel = dispatch.Kernel("traced_once", _double, compiled, auto={("cpu", "*"): ("xla",)})
    x = tf.ones([3])
    for source in ("explicit", "table", "tuned"):
        kernel.run(dispatch.Selection("xla", None, source, "cpu", "float32"), x)
    assert traces == ["explicit"]


def test_a_selection_describes_itself():
    from fastlayers.kernels import AttentionVariant

    selection = dispatch.Selection("graph", AttentionVariant(256, 2048), "tuned")
    assert selection.describe() == "graph 256x2048, tuned"
    assert dispatch.Selection("graph", source="table").describe() == "graph, table"


class _FakeNative:
    """A native implementation as a provider plugs one in: callable, with a reason
    when its op is not built."""

    def __init__(self, reason=None):
        self.reason = reason
        self.calls = []

    def __call__(self, x, *, selection):
        self.calls.append(selection)
        return 2 * x

    def not_built_reason(self):
        return self.reason


def _native_kernel(native, row=("native", "graph", "reference")):
    return dispatch.Kernel("with_native", _double, auto={("cpu", "*"): row}, native=native)


def test_a_native_implementation_runs_when_asked_and_when_auto_prefers_it():
    native = _FakeNative()
    kernel = _native_kernel(native)
    x = tf.ones([3])
    assert kernel(x, implementation="native").numpy().tolist() == [2.0, 2.0, 2.0]
    assert kernel.select(None, platform="cpu", dtype=tf.float32).implementation == "native"
    assert [s.implementation for s in native.calls] == ["native"]
    assert "native" in kernel.implementations()


def test_a_kernel_without_native_says_so():
    kernel = _native_kernel(None)
    with pytest.raises(ValueError, match=r"implementation='native' cannot run kernel 'with_native'.*"
                                         r"has no native implementation"):
        kernel.select("native", platform="cpu", dtype=tf.float32)
    assert kernel.select(None, platform="cpu", dtype=tf.float32).implementation == "graph"
    assert "native" not in kernel.implementations()


def test_a_native_op_that_is_not_built_gives_the_providers_reason():
    kernel = _native_kernel(_FakeNative("g++ exited with status 1"))
    with pytest.raises(ValueError, match=r"native op is not available: g\+\+ exited with status 1"):
        kernel(tf.ones([3]), implementation="native")
    assert kernel.select(None, platform="cpu", dtype=tf.float32).implementation == "graph"


def test_inside_an_xla_cluster_auto_keeps_xla_and_an_explicit_native_request_raises():
    native = _FakeNative()
    kernel = _native_kernel(native)

    @tf.function(jit_compile=True)
    def auto(x):
        return kernel(x)

    assert auto(tf.ones([3])).numpy().tolist() == [2.0, 2.0, 2.0]
    assert native.calls == []

    @tf.function(jit_compile=True)
    def explicit(x):
        return kernel(x, implementation="native")

    with pytest.raises(ValueError, match=r"cannot run inside an XLA cluster"):
        explicit(tf.ones([3]))


class _NativeForInference(_FakeNative):
    """A native implementation whose gradient is slower than the compiled paths'."""

    auto_while_training = False


def test_the_table_passes_over_a_native_that_asks_so_while_a_tape_records():
    native = _NativeForInference()
    kernel = _native_kernel(native)
    assert kernel.select(None, platform="cpu", dtype=tf.float32).implementation == "native"
    with tf.GradientTape():
        assert kernel.select(None, platform="cpu", dtype=tf.float32).implementation == "graph"
        explicit = kernel.select("native", platform="cpu", dtype=tf.float32)
        assert (explicit.implementation, explicit.source) == ("native", "explicit")
    assert kernel.table_reasons("native") == []
    with tf.GradientTape():
        (reason,) = kernel.table_reasons("native")
        assert reason.startswith("a gradient tape is recording")
    # A native implementation without the attribute trains too.
    with tf.GradientTape():
        assert _native_kernel(_FakeNative()).table_reasons("native") == []


class _CountingNative(_FakeNative):
    def not_built_reason(self):
        self.calls.append("asked")
        return None


def test_whether_the_native_op_builds_is_asked_only_when_nothing_else_refuses():
    native = _CountingNative()
    refuse_float16 = lambda implementation, *, platform, dtype: (  # noqa: E731
        ["no float16"] if implementation == "native" and dtype == tf.float16 else []
    )
    kernel = dispatch.Kernel("counted", _double, auto={("cpu", "*"): ("native", "graph")},
                             native=native, not_supported_reasons=refuse_float16)
    assert kernel.not_supported_reasons("native", platform="cpu", dtype=tf.float16) == ["no float16"]
    assert native.calls == []
    assert kernel.not_supported_reasons("native", platform="cpu", dtype=tf.float32) == []
    assert native.calls == ["asked"]


def test_a_native_implementation_receives_its_variant_in_the_selection():
    native = _FakeNative()
    variants = lambda implementation, **_: (  # noqa: E731
        ("native-default", "native-other") if implementation == "native" else ()
    )
    kernel = dispatch.Kernel("with_variants", _double, auto={("cpu", "*"): ("native", "graph")},
                             native=native, variants=variants)
    kernel(tf.ones([3]))
    assert [s.variant for s in native.calls] == ["native-default"]
    candidates = kernel.tuning_candidates(platform="cpu", dtype=tf.float32, shapes=((3,),))
    assert [(c.implementation, c.variant) for c in candidates if c.implementation == "native"] == [
        ("native", "native-default"), ("native", "native-other")
    ]


def test_auto_rows_may_name_native_and_rows_by_variant():
    row = dispatch.check_auto_row({("cpu", "*"): ("native", "xla"), ("cpu", "*", "tiled"): ("xla",)})
    assert row[("cpu", "*", "tiled")] == ("xla",)
    with pytest.raises(ValueError, match=r"entries must be a non-empty tuple of 'reference', 'graph', 'xla', 'native'"):
        dispatch.check_auto_row({("cpu", "*"): ("fast",)})
