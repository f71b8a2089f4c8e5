"""MaxPooling2D against a numpy oracle and keras.layers.MaxPooling2D: outputs, tie routing."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import COMPILED, DEVICES, IMPLEMENTATIONS, round_to

from fastlayers import kernels, layers
from fastlayers.kernels import dispatch, pooling

# (pool_size, strides, padding, data_format, input shape): odd sizes, overlapping
# windows, windows that do not tile the input, both layouts.
CASES = [
    ((2, 2), (2, 2), "valid", "channels_last", (2, 7, 9, 3)),
    ((3, 2), (2, 3), "same", "channels_first", (2, 3, 7, 8)),
    ((3, 3), (1, 1), "same", "channels_last", (1, 5, 6, 2)),
    ((2, 3), (3, 1), "valid", "channels_first", (2, 2, 8, 7)),
    ((2, 3), (2, 3), "valid", "channels_first", (2, 2, 7, 8)),  # tiles, with leftovers
    # Uneven "same" padding (the odd row or column after the input), where XLA's
    # own "same" gradient routes ties elsewhere: tiling the padded input, then not.
    ((2, 2), (2, 2), "same", "channels_last", (1, 3, 3, 1)),
    ((2, 2), (1, 2), "same", "channels_first", (1, 2, 3, 9)),
    ((2, 3), (2, 3), "same", "channels_last", (2, 4, 5, 3)),
    ((2, 2), (1, 1), "same", "channels_last", (1, 3, 8, 3)),
]


def _padding(size, pool, stride, padding):
    if padding == "valid":
        return 0, (size - pool) // stride + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + pool - size, 0)
    return total // 2, out  # TensorFlow's "same": the odd row goes after the input


def pool_oracle(x, pool_size, strides, padding, data_format, upstream=None):
    """Max pooling in numpy; with ``upstream``, also the input gradient.

    A window's gradient goes to the first of its maxima in row-major order.
    """
    if data_format == "channels_first":
        x = x.transpose(0, 2, 3, 1)
        if upstream is not None:
            upstream = upstream.transpose(0, 2, 3, 1)
    b, h, w, c = x.shape
    top, p = _padding(h, pool_size[0], strides[0], padding)
    left, q = _padding(w, pool_size[1], strides[1], padding)
    y = np.empty((b, p, q, c))
    grad = np.zeros_like(x, dtype=np.float64)
    for i in range(p):
        r0 = i * strides[0] - top
        rows = range(max(r0, 0), min(r0 + pool_size[0], h))
        for j in range(q):
            c0 = j * strides[1] - left
            cols = range(max(c0, 0), min(c0 + pool_size[1], w))
            window = x[:, rows.start : rows.stop, cols.start : cols.stop, :]
            flat = window.reshape(b, -1, c)
            y[:, i, j, :] = flat.max(axis=1)
            first = flat.argmax(axis=1)  # argmax returns the first maximum
            if upstream is not None:
                for n in range(b):
                    for ch in range(c):
                        r, s = divmod(first[n, ch], len(cols))
                        grad[n, rows.start + r, cols.start + s, ch] += upstream[n, i, j, ch]
    if data_format == "channels_first":
        y, grad = y.transpose(0, 3, 1, 2), grad.transpose(0, 3, 1, 2)
    return y, grad


def _input_gradient(layer, x, upstream):
    x = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    return y, tape.gradient(y, x, output_gradients=tf.cast(upstream, y.dtype))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_numpy_and_keras_under_every_policy(implementation, policy, rng):
    for case in CASES[:2]:
        pool_size, strides, padding, data_format, shape = case
        x = rng.standard_normal(shape).astype(np.float32)
        ours = layers.MaxPooling2D(
            pool_size, strides, padding, data_format, implementation=implementation
        )
        theirs = keras.layers.MaxPooling2D(pool_size, strides, padding, data_format)
        y = ours(x)
        assert y.dtype == policy.compute_dtype
        expected, _ = pool_oracle(round_to(x, policy.compute_dtype), *case[:4])
        # Max pooling picks an input and never rounds: equality, not tolerance.
        np.testing.assert_array_equal(np.asarray(y, np.float64), expected, err_msg=str(case))
        np.testing.assert_array_equal(np.asarray(y), np.asarray(theirs(x)), err_msg=str(case))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_ties_route_the_gradient_to_the_first_maximum(implementation, rng):
    for case in CASES:
        pool_size, strides, padding, data_format, shape = case
        x = rng.integers(0, 2, size=shape).astype(np.float32)  # ties in most windows
        ours = layers.MaxPooling2D(
            pool_size, strides, padding, data_format, implementation=implementation
        )
        theirs = keras.layers.MaxPooling2D(pool_size, strides, padding, data_format)
        upstream = rng.integers(1, 5, size=ours.compute_output_shape(shape)).astype(np.float32)
        y, grad = _input_gradient(ours, x, upstream)
        expected_y, expected_grad = pool_oracle(x, *case[:4], upstream=upstream)
        np.testing.assert_array_equal(y.numpy(), expected_y, err_msg=str(case))
        np.testing.assert_array_equal(grad.numpy(), expected_grad, err_msg=str(case))
        _, keras_grad = _input_gradient(theirs, x, upstream)
        np.testing.assert_array_equal(grad.numpy(), keras_grad.numpy(), err_msg=str(case))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_tied_window_beside_uneven_same_padding_routes_to_its_first_maximum(implementation):
    # Pool 2, stride 2, "same" on 3x3 pads one row and column after the input; the
    # top-left window [[0, 1], [1, 0]] holds no padding and sends its gradient to (0, 1).
    x = np.zeros((1, 3, 3, 1), np.float32)
    x[0, 0, 1, 0] = x[0, 1, 0, 0] = 1.0
    layer = layers.MaxPooling2D(2, 2, "same", implementation=implementation)
    _, grad = _input_gradient(layer, x, np.ones((1, 2, 2, 1), np.float32))
    expected = np.zeros((3, 3))
    expected[0, 1] = expected[0, 2] = expected[2, 0] = expected[2, 2] = 1.0
    np.testing.assert_array_equal(grad.numpy()[0, :, :, 0], expected)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_windows_of_minus_inf_beside_even_same_padding_keep_their_gradient(data_format):
    # Pool 3, stride 1, "same" pads one row and column on each side. Explicit -inf
    # padding would tie with these inputs and come first in each corner window, so
    # with static shapes XLA keeps its own "same" here, which routes ties exactly.
    shape = (1, 3, 3, 1) if data_format == "channels_last" else (1, 1, 3, 3)
    x = np.full(shape, -np.inf, np.float32)
    options = dict(pool_size=(3, 3), strides=(1, 1), padding="same", data_format=data_format)

    @tf.function(jit_compile=True)
    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = pooling.max_pool2d_compiled(x, **options)
        return tape.gradient(y, x)

    _, expected = pool_oracle(x, (3, 3), (1, 1), "same", data_format, upstream=np.ones(shape))
    np.testing.assert_array_equal(grad(tf.constant(x)).numpy(), expected)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_same_padding_under_xla_with_unknown_spatial_axes(data_format, rng):
    # The explicit padding is computed from the run-time shape when the trace has none.
    pool_size, strides = (2, 3), (2, 2)
    shape = (2, 5, 7, 3) if data_format == "channels_last" else (2, 3, 5, 7)
    x = rng.integers(0, 2, size=shape).astype(np.float32)
    options = dict(pool_size=pool_size, strides=strides, padding="same", data_format=data_format)
    upstream = rng.integers(1, 5, size=pooling.pooled_shape(shape, **options)).astype(np.float32)

    @tf.function(jit_compile=True, input_signature=[tf.TensorSpec([None] * 4, tf.float32)])
    def pool_and_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = pooling.max_pool2d_compiled(x, **options)
        return y, tape.gradient(y, x, output_gradients=upstream)

    y, grad = pool_and_grad(tf.constant(x))
    expected_y, expected_grad = pool_oracle(
        x, pool_size, strides, "same", data_format, upstream=upstream
    )
    np.testing.assert_array_equal(y.numpy(), expected_y)
    np.testing.assert_array_equal(grad.numpy(), expected_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_output_and_gradient_equal_keras_on_device(implementation, device, rng):
    # Keras runs the device's own pooling kernel (cuDNN on GPU): the drop-in must
    # agree with it there too, ties included.
    case = CASES[1]
    x = rng.integers(0, 3, size=case[4]).astype(np.float32)
    upstream = rng.integers(1, 5, size=(2, 3, 4, 3)).astype(np.float32)
    with tf.device(device):
        ours = layers.MaxPooling2D(*case[:4], implementation=implementation)
        y, grad = _input_gradient(ours, x, upstream)
        keras_y, keras_grad = _input_gradient(keras.layers.MaxPooling2D(*case[:4]), x, upstream)
    np.testing.assert_array_equal(y.numpy(), keras_y.numpy())
    np.testing.assert_array_equal(grad.numpy(), keras_grad.numpy())


@pytest.mark.parametrize("implementation", COMPILED)
def test_compiled_gradients_match_reference_under_every_policy(implementation, policy, rng):
    for case in CASES[:2]:  # tiled windows (XLA's own gradient), then overlapping ones
        x = rng.standard_normal(case[4]).astype(np.float32)
        output_shape = layers.MaxPooling2D(*case[:4]).compute_output_shape(case[4])
        upstream = rng.standard_normal(output_shape).astype(np.float32)
        _, expected = _input_gradient(
            layers.MaxPooling2D(*case[:4], implementation="reference"), x, upstream
        )
        _, actual = _input_gradient(
            layers.MaxPooling2D(*case[:4], implementation=implementation), x, upstream
        )
        kernels.tolerance(policy.compute_dtype, grad=True).check(
            actual, expected, what=f"dx {case}"
        )


@pytest.mark.parametrize("pool_size, strides, pooled_by", [
    ((2, 2), (2, 2), "Maximum"),  # tiled windows: element-wise maxima of strided views
    ((3, 3), (2, 2), "MaxPool"),  # overlapping windows: XLA's reduce-window, in NCHW
])
def test_channels_first_pools_in_place_under_xla(pool_size, strides, pooled_by):
    x = tf.zeros((1, 3, 8, 8))
    options = dict(pool_size=pool_size, strides=strides, padding="valid", data_format="channels_first")
    traced = tf.function(lambda x: pooling.max_pool2d_compiled(x, **options), jit_compile=True)
    ops = {op.type for op in traced.get_concrete_function(x).graph.get_operations()}
    assert pooled_by in ops and "Transpose" not in ops
    graph = tf.function(lambda x: pooling.max_pool2d_compiled(x, **options))
    assert "Transpose" in {op.type for op in graph.get_concrete_function(x).graph.get_operations()}


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_tiled_windows_skip_select_and_scatter_under_xla(data_format):
    # XLA's select-and-scatter (TF's MaxPoolGrad lowered) is the slow part of training.
    x = tf.zeros((1, 4, 6, 6))
    options = dict(pool_size=(2, 2), strides=(2, 2), padding="valid", data_format=data_format)

    def loss_grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = pooling.max_pool2d_compiled(x, **options)
        return tape.gradient(y, x)

    traced = tf.function(loss_grad, jit_compile=True).get_concrete_function(x)
    op_types = {op.type for op in traced.graph.get_operations()}
    assert not op_types & {"MaxPoolGrad", "MaxPoolGradV2"}


def test_defaults_match_keras():
    ours, theirs = layers.MaxPooling2D(), keras.layers.MaxPooling2D()
    for key in ("pool_size", "strides", "padding", "data_format"):
        assert tuple(np.atleast_1d(ours.get_config()[key])) == tuple(
            np.atleast_1d(theirs.get_config()[key])
        )


def test_arguments_are_standardized():
    layer = layers.MaxPooling2D(3, padding="SAME", data_format="Channels_First")
    assert (layer.pool_size, layer.strides) == ((3, 3), (3, 3))
    assert (layer.padding, layer.data_format) == ("same", "channels_first")
    assert layers.MaxPooling2D(2, strides=(1, 2)).strides == (1, 2)


def test_data_format_none_follows_keras_config():
    keras.config.set_image_data_format("channels_first")
    try:
        assert layers.MaxPooling2D().data_format == "channels_first"
    finally:
        keras.config.set_image_data_format("channels_last")
    assert layers.MaxPooling2D().data_format == "channels_last"


def test_built_at_construction_with_no_parameters():
    # Keras builds its weightless layers in __init__: count_params() works at once.
    layer, theirs = layers.MaxPooling2D(), keras.layers.MaxPooling2D()
    assert layer.built and theirs.built
    assert layer.count_params() == theirs.count_params() == 0


def test_max_pool2d_is_an_alias_as_in_keras():
    assert keras.layers.MaxPool2D is keras.layers.MaxPooling2D
    assert layers.MaxPool2D is layers.MaxPooling2D
    config = layers.MaxPool2D(3, padding="same").get_config()
    assert config == layers.MaxPooling2D(3, padding="same", name=config["name"]).get_config()
    assert keras.saving.get_registered_name(layers.MaxPool2D) == "fastlayers>MaxPooling2D"


def test_kernel_standardizes_arguments_as_keras_ops(rng):
    x = rng.standard_normal((1, 5, 6, 2)).astype(np.float32)
    for kwargs in [
        dict(pool_size=2),
        dict(pool_size=[2, 3], strides=1),
        dict(pool_size=(3, 3), strides=2, padding="SAME"),
        dict(pool_size=2, padding="Valid", data_format="CHANNELS_LAST"),
    ]:
        np.testing.assert_array_equal(
            kernels.max_pool2d(x, **kwargs), keras.ops.max_pool(x, **kwargs), err_msg=str(kwargs)
        )
    with pytest.raises(ValueError, match=r"`pool_size`.*Received: pool_size=\[2, 0\]"):
        kernels.max_pool2d(x, pool_size=[2, 0])
    with pytest.raises(ValueError, match=r"`padding`.*Received: padding='full'"):
        kernels.max_pool2d(x, padding="full")


def test_config_round_trip():
    layer = layers.MaxPooling2D((3, 2), (1, 2), "same", "channels_first", implementation="xla")
    config = layer.get_config()
    clone = layers.MaxPooling2D.from_config(config)
    assert clone.get_config() == config
    assert config["implementation"] == "xla"


def test_compute_output_shape_matches_output(rng):
    for pool_size, strides, padding, data_format, shape in CASES:
        layer = layers.MaxPooling2D(pool_size, strides, padding, data_format)
        x = rng.standard_normal(shape).astype(np.float32)
        assert layer.compute_output_shape(shape) == tuple(layer(x).shape)
        theirs = keras.layers.MaxPooling2D(pool_size, strides, padding, data_format)
        assert layer.compute_output_shape(shape) == theirs.compute_output_shape(shape)
    assert layers.MaxPooling2D().compute_output_shape((None, None, 7, 3)) == (None, None, 3, 3)


def test_keras_file_round_trip_in_safe_mode(tmp_path, rng):
    model = keras.Sequential(
        [keras.Input((7, 9, 3)), layers.MaxPooling2D(3, 2, "same"), keras.layers.Flatten()]
    )
    path = tmp_path / "pool.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.layers[0], layers.MaxPooling2D)
    x = rng.standard_normal((2, 7, 9, 3)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x), model(x))


def test_trains_in_a_model(rng):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(4, 3, padding="same"),
            layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    model.compile("sgd", "mse")
    x = rng.standard_normal((16, 8, 8, 2)).astype(np.float32)
    history = model.fit(x, np.ones((16, 1)), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_pool_larger_than_input_with_valid_raises():
    with pytest.raises(ValueError, match=r"pool_size=\(3, 3\), inputs.shape=\(1, 2, 5, 1\)"):
        layers.MaxPooling2D(3)(np.zeros((1, 2, 5, 1), np.float32))
    with pytest.raises(ValueError, match=r"pool_size=\(3, 3\), inputs.shape=\(None, 1, 2, 5\)"):
        layers.MaxPooling2D(3, data_format="channels_first").compute_output_shape((None, 1, 2, 5))
    # "same" pads, so the same window fits.
    assert layers.MaxPooling2D(3, padding="same")(np.zeros((1, 2, 5, 1), np.float32)).shape == (
        1,
        1,
        2,
        1,
    )


def test_wrong_rank_raises():
    with pytest.raises(ValueError, match=r"expected ndim=4, found ndim=3"):
        layers.MaxPooling2D()(np.zeros((2, 4, 4), np.float32))
    layer = layers.MaxPooling2D(name="pool")
    message = r"^Layer 'pool' expects a 4D input. Received: input_shape=\(None, 4, 4\)$"
    with pytest.raises(ValueError, match=message):
        layer.compute_output_shape((None, 4, 4))
    with pytest.raises(ValueError, match=r"x.shape=\(2, 4, 4\)"):
        kernels.max_pool2d(np.zeros((2, 4, 4), np.float32))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pool_size=0), r"`pool_size`.*Received: pool_size=0"),
        (dict(pool_size=(2, 2, 2)), r"`pool_size`.*Received: pool_size=\(2, 2, 2\)"),
        (dict(strides=(1, -1)), r"`strides`.*Received: strides=\(1, -1\)"),
        (dict(padding="causal"), r"`padding`.*Received: padding='causal'"),
        (dict(data_format="NHWC"), r"`data_format`.*Received: data_format='NHWC'"),
        (dict(implementation="fast"), r"`implementation`.*Received: implementation='fast'"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        layers.MaxPooling2D(**kwargs)


@pytest.mark.parametrize("pool_size, strides, padding, data_format, row", [
    ((2, 2), (2, 2), "valid", "channels_last", "tiled"),
    ((2, 2), (2, 2), "same", "channels_last", None),
    ((3, 3), (2, 2), "valid", "channels_last", None),
    ((2, 3), (2, 3), "valid", "channels_first", "channels_first_tiled"),
    ((2, 2), (1, 1), "valid", "channels_first", "channels_first"),
])
def test_windows_that_tile_the_input_have_their_own_auto_row(
    pool_size, strides, padding, data_format, row
):
    options = dict(pool_size=pool_size, strides=strides, padding=padding, data_format=data_format)
    variant = pooling.variant_of(**options)
    assert variant.auto_row == row
    assert variant.tiled == (padding == "valid" and strides == pool_size)
    platform = dispatch.cpu_platform()
    keys = [(platform, "float32", row), (platform, "*", row)] if row else [(platform, "float32"), (platform, "*")]
    expected = next(pooling.MAX_POOL2D.auto[key] for key in keys if key in pooling.MAX_POOL2D.auto)
    assert pooling.MAX_POOL2D.candidates(platform, tf.float32, row) == expected
    name = "max_pool2d"
    layer = layers.MaxPooling2D(pool_size, strides, padding, data_format)

    @tf.function
    def step(x):
        return layer(x)

    shape = (1, 6, 6, 2) if data_format == "channels_last" else (1, 2, 6, 6)
    graph = step.get_concrete_function(tf.TensorSpec(shape)).graph
    assert any(f"fastlayers/{name}/" in op.name for op in graph.get_operations())


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_integer_images_pool_as_kerass_layer_does(implementation, rng):
    x = rng.integers(0, 256, (2, 5, 6, 3)).astype(np.uint8)
    y = layers.MaxPooling2D(implementation=implementation)(x)
    expected = keras.layers.MaxPooling2D()(x)
    assert y.dtype == expected.dtype == tf.uint8
    np.testing.assert_array_equal(y, expected)
