"""One way to name a layer for ``fastlayers bench --layer`` and ``fastlayers profile``.

A layer is named by

- a fastlayers layer name (``Dense``): built with its row of :data:`LAYER_DEFAULTS`
  (constructor arguments and input shapes), which ``layer_args`` and
  ``input_shape`` override;
- ``module:Class`` (``my_layers:MyDense``): any Keras layer class importable from
  ``module``, a user's own ``CompiledLayer`` or ``FastLayer`` included; it has no
  defaults, so it needs an input shape;
- in Python, the class itself.

:func:`resolve_layer` checks everything a run needs before anything runs or is
written: the module imports, the name is a Keras layer class, the class accepts
its constructor arguments, and the layer takes the input shapes (one symbolic call,
which builds the weights without computing anything). Each failure is a
:class:`LayerError` whose message is one line.

Input shapes are given batch axis first, one per input; a layer with several
inputs is called with them as one list (``layer([a, b])``), as Keras's functional
API calls multi-input layers. On the command line the shapes of several inputs are
separated by ``;``: ``--input-shape "8,64;8,32"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import numbers
import re
from collections.abc import Callable

import keras
import tensorflow as tf
from fastlayers.bench.errors import CommandError
from fastlayers.kernels import dispatch

Shapes = tuple[tuple[int, ...], ...]


class LayerError(CommandError):
    """A layer that cannot be resolved, built or called: reported as one line."""


def call_on_input(layer, inputs):
    """Calls a layer on its input, or on the list of its inputs."""
    return layer(inputs)


@dataclasses.dataclass(frozen=True)
class LayerDefaults:
    """A representative workload for a fastlayers layer named on the command line.

    ``fastlayers bench --layer NAME`` and ``fastlayers profile NAME`` use it;
    ``--layer-args`` updates ``args`` and ``--input-shape`` replaces ``input_shape``.

    Attributes:
        args: constructor arguments.
        input_shape: the input's shape, batch axis first, or a tuple of shapes for
            a layer with several inputs (called with them as one list).
        call: ``call(layer, x)``, how a step calls the layer on its input (one
            tensor, or the list of them); an attention layer, say, as ``layer(x, x)``.
    """

    args: dict
    input_shape: tuple
    call: Callable = call_on_input


# FixedMask's workload: a 128x128 image with a 4x4 hole in its middle, as in the
# tutorial the layer comes from.
_HOLE_MASK = [[0.0 if 62 <= i < 66 and 62 <= j < 66 else 1.0 for j in range(128)]
              for i in range(128)]

LAYER_DEFAULTS: dict[str, LayerDefaults] = {
    "Dense": LayerDefaults({"units": 4096, "activation": "relu"}, (4096, 1024)),
    "Linear": LayerDefaults({"units": 4096}, (4096, 1024)),
    # Attention's query projection, on Dense's rows.
    "EinsumDense": LayerDefaults(
        {"equation": "abc,cde->abde", "output_shape": (None, 8, 64), "bias_axes": "de"}, (4, 1024, 512)
    ),
    # A ResNet stem's activations.
    "MaxPooling2D": LayerDefaults({"pool_size": 2}, (64, 112, 112, 64)),
    "FixedMask": LayerDefaults({"mask": _HOLE_MASK}, (256, 128, 128)),
    "CenterZero": LayerDefaults({"size": [4, 4]}, (256, 128, 128)),
    "Exponential": LayerDefaults({}, (256, 128, 128)),
    # Inputs [a, b]: a (4096, 512) projected to b's 512 features.
    "ResidualProjection": LayerDefaults({"units": 512}, ((4096, 512), (4096, 512))),
    # Self-attention over 2048 tokens of width 512: 8 heads of 64, the attention bench's shape.
    "MultiHeadAttention": LayerDefaults(
        {"num_heads": 8, "key_dim": 64}, (4, 2048, 512), call=lambda layer, x: layer(x, x)
    ),
    # The grouped-query issue's case: 8 query heads, 2 key/value heads, a causal
    # sliding window of 256 over 4096 positions.
    "GroupQueryAttention": LayerDefaults(
        {"head_dim": 64, "num_query_heads": 8, "num_key_value_heads": 2, "sliding_window": 256},
        (1, 4096, 512), call=lambda layer, x: layer(x, x, use_causal_mask=True),
    ),
    "AttentionPooling": LayerDefaults({}, (64, 512, 256)),
    # 8192 tokens of width 1024, the shape of the normalization issue's targets.
    "LayerNormalization": LayerDefaults({}, (8192, 1024)),
    "RMSNormalization": LayerDefaults({}, (8192, 1024)),
}

SCOPE_PATTERN = re.compile(
    r"fastlayers/[A-Za-z0-9_.]+/(?:" + "|".join(dispatch.ALL_IMPLEMENTATIONS) + r")\b"
)


def builtin_names() -> list[str]:
    """The fastlayers layers that can be named without a module."""
    from fastlayers import layers

    # MultiHeadAttention subclasses Keras's own layer, not FastLayer. An alias
    # (MaxPool2D for MaxPooling2D) is left out: resolve_layer takes it as its class.
    # Functions (accelerate) are not layers.
    return sorted(
        name for name in layers.__all__
        if isinstance(getattr(layers, name), type)
        and issubclass(getattr(layers, name), keras.layers.Layer)
        and getattr(layers, name) not in (layers.FastLayer, layers.CompiledLayer)
        and getattr(layers, name).__name__ == name
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def format_shapes(shapes: Shapes) -> str:
    """``((8, 64), (8, 32))`` as ``8x64, 8x32``."""
    return ", ".join("x".join(str(d) for d in shape) for shape in shapes)


def normalize_shapes(input_shape) -> Shapes | None:
    """One shape (``(8, 64)``) or several (``[(8, 64), (8, 32)]``) as a tuple of shapes."""
    if input_shape is None or len(input_shape) == 0:
        return None
    if all(isinstance(d, numbers.Integral) for d in input_shape):
        return (tuple(int(d) for d in input_shape),)
    return tuple(tuple(int(d) for d in shape) for shape in input_shape)


def random_inputs(shapes: Shapes, policy: str = "float32"):
    """Random inputs of ``shapes`` in the policy's compute dtype (a list for several)."""
    dtype = tf.as_dtype(keras.DTypePolicy(policy).compute_dtype)
    tensors = [
        tf.cast(tf.random.stateless_normal(shape, seed=(i, 0)), dtype)
        for i, shape in enumerate(shapes)
    ]
    return tensors[0] if len(tensors) == 1 else tensors


@contextlib.contextmanager
def _global_policy(policy: str):
    # A layer takes the global policy at construction; setting it reaches classes
    # whose constructor has no `dtype` argument (a tutorial's `__init__(self, units)`).
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A resolved layer: its class, constructor arguments, inputs and call.

    Attributes:
        name: as named: ``"Dense"``, ``"my_layers:MyDense"`` (``module:qualname``
            when given a class).
        cls: the Keras layer class.
        args: constructor arguments, without ``dtype`` and ``implementation``.
        input_shapes: one shape per input, batch axis first.
        call: ``call(layer, inputs)``.
    """

    name: str
    cls: type
    args: dict
    input_shapes: Shapes
    call: Callable = call_on_input

    @property
    def dispatches(self) -> bool:
        """Whether the class takes ``implementation=`` (see :func:`takes_implementation`)."""
        return takes_implementation(self.cls)

    @property
    def batch(self) -> int:
        return self.input_shapes[0][0]

    def shapes_at(self, batch: int) -> Shapes:
        """The input shapes with ``batch`` for the batch axis.

        The batch axis is the first axis of each input whose first axis equals the
        first input's; other inputs keep their shape.
        """
        if batch == self.batch:
            return self.input_shapes
        return tuple(
            (batch, *shape[1:]) if shape[0] == self.batch else shape for shape in self.input_shapes
        )

    def args_text(self, limit: int = 60) -> str:
        text = json.dumps(self.args, default=repr)
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def make(self, policy: str = "float32", implementation=None) -> keras.layers.Layer:
        """A new, unbuilt layer under the Keras dtype policy ``policy``."""
        kwargs = {"implementation": implementation} if self.dispatches else {}
        with _global_policy(policy):
            return self.cls(**self.args, **kwargs)

    def build(self, layer, shapes: Shapes, policy: str = "float32"):
        """Builds ``layer`` by a symbolic call on ``shapes``; returns its symbolic output.

        A symbolic call creates the weights eagerly, outside any ``tf.function`` a
        step is later traced in, and computes nothing. It runs under ``policy`` too,
        for layers that create sublayers in ``build``.
        """
        dtype = keras.DTypePolicy(policy).compute_dtype
        symbolic = [keras.KerasTensor(shape, dtype) for shape in shapes]
        with _global_policy(policy):
            return self.call(layer, symbolic[0] if len(symbolic) == 1 else symbolic)

    def traced_graph(self, shapes: Shapes, policy: str = "float32", implementation=None,
                     device: str = "/CPU:0") -> tf.Graph:
        """The graph of one call of a new layer, traced in a ``tf.function``."""
        layer = self.make(policy, implementation)
        self.build(layer, shapes, policy)
        dtype = tf.as_dtype(keras.DTypePolicy(policy).compute_dtype)
        call = self.call

        def one_call(*tensors):
            return call(layer, tensors[0] if len(tensors) == 1 else list(tensors))

        with tf.device(device):
            return tf.function(one_call).get_concrete_function(
                *[tf.TensorSpec(shape, dtype) for shape in shapes]).graph

    def flops(self, shapes: Shapes) -> int:
        """FLOPs of one call, by TensorFlow's op counter on the traced float32 graph.

        A ``FastLayer`` is traced with ``implementation="reference"``: the compiled
        paths are nested functions whose ops the counter does not see.
        """
        from fastlayers.bench import flops as flops_lib

        implementation = "reference" if self.dispatches else None
        return flops_lib.counted_flops(self.traced_graph(shapes, "float32", implementation))

    def scopes(self, shapes: Shapes, policy: str, implementation=None,
               device: str = "/CPU:0") -> list[str]:
        """The ``fastlayers/<kernel>/<implementation>`` scopes one traced call runs."""
        graph = self.traced_graph(shapes, policy, implementation, device)
        return sorted({match for op in graph.get_operations()
                       for match in SCOPE_PATTERN.findall(op.name)})


def takes_implementation(cls) -> bool:
    """Whether a layer class takes ``implementation=``: a ``FastLayer``, or a drop-in
    that subclasses Keras's own layer (``LayerNormalization``) and names the argument."""
    from fastlayers.layers import FastLayer

    if issubclass(cls, FastLayer):
        return True
    try:
        return "implementation" in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # a builtin __init__: no such argument
        return False


def import_layer_class(text: str) -> type:
    """The Keras layer class named by ``module:Class`` (``Class`` may be dotted)."""
    module_name, _, qualname = text.partition(":")
    if not module_name or not qualname:
        raise LayerError(f"expected a layer as module:Class, e.g. my_layers:MyDense. "
                         f"Received: {text!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 — any failure of the user's module is reported
        raise LayerError(f"cannot import module {module_name!r}: {_first_line(error)}") from None
    found = module
    for part in qualname.split("."):
        if not hasattr(found, part):
            raise LayerError(f"module {module_name!r} has no attribute {qualname!r}")
        found = getattr(found, part)
    if not (isinstance(found, type) and issubclass(found, keras.layers.Layer)):
        kind = f"class {found.__name__}" if isinstance(found, type) else type(found).__name__
        raise LayerError(f"{text} is not a Keras layer class (a keras.layers.Layer subclass); "
                         f"it is a {kind}")
    return found


def resolve_layer(layer, *, input_shape=None, layer_args: dict | None = None) -> LayerSpec:
    """Resolves a layer name or class, checking it can be built and called.

    Args:
        layer: a fastlayers layer name (``"Dense"``), ``"module:Class"``, or a Keras
            layer class.
        input_shape: one shape (``(64, 128)``) or one per input
            (``[(8, 64), (8, 32)]``), batch axis first; defaults to the
            ``LAYER_DEFAULTS`` row of a fastlayers layer.
        layer_args: constructor arguments; for a fastlayers layer they update its
            ``LAYER_DEFAULTS`` row.

    Returns:
        A :class:`LayerSpec`.

    Raises:
        LayerError: the module does not import, the name is not a Keras layer
            class, the class rejects its arguments or the layer its input shapes.
    """
    from fastlayers import layers

    defaults = None
    if isinstance(layer, type):
        if not issubclass(layer, keras.layers.Layer):
            raise LayerError(f"{layer.__qualname__} is not a Keras layer class "
                             "(a keras.layers.Layer subclass)")
        cls, name = layer, f"{layer.__module__}:{layer.__qualname__}"
    elif not isinstance(layer, str):
        raise LayerError(f"expected a layer name, module:Class or a Keras layer class. "
                         f"Received: {layer!r}")
    elif ":" in layer:
        cls, name = import_layer_class(layer), layer
    elif layer in layers.__all__ and getattr(layers, layer).__name__ in builtin_names():
        cls = getattr(layers, layer)
        name = cls.__name__  # an alias runs as its class, with the class's defaults
        defaults = LAYER_DEFAULTS.get(name)
    else:
        raise LayerError(f"unknown layer {layer!r}; fastlayers.layers has "
                         f"{', '.join(builtin_names())}, or name your own as module:Class")
    if layer_args is not None and not isinstance(layer_args, dict):
        raise LayerError(f"layer arguments must be a dict (a JSON object). "
                         f"Received: {layer_args!r}")
    args = {**(defaults.args if defaults else {}), **(layer_args or {})}
    default_shapes = normalize_shapes(defaults.input_shape) if defaults else None
    given = layer_args or {}
    if "dtype" in given:
        raise LayerError("`dtype` is not a layer argument here: --dtypes (bench) and --dtype "
                         "(profile) set the dtype policy")
    if "implementation" in given and takes_implementation(cls):
        raise LayerError("`implementation` is not a layer argument here: bench measures each "
                         "implementation as a provider, and profile takes --implementation")
    shapes = normalize_shapes(input_shape) or default_shapes
    if shapes is None:
        where = ("has no row in fastlayers.bench.layer_spec.LAYER_DEFAULTS" if isinstance(
            layer, str) and ":" not in layer else "is not a fastlayers layer with defaults")
        raise LayerError(f"layer {name} {where}: give its input shape (--input-shape, "
                         "e.g. 64,128)")
    if any(len(shape) == 0 or min(shape) <= 0 for shape in shapes):
        raise LayerError(f"input shapes need positive dimensions. Received: {shapes}")
    spec = LayerSpec(name, cls, args, shapes, defaults.call if defaults else call_on_input)
    check(spec)
    return spec


def check(spec: LayerSpec) -> None:
    """Constructs the layer and calls it symbolically; LayerError if either fails."""
    implementation = "reference" if spec.dispatches else None
    # The class and its build are the user's code: whatever they raise is the
    # answer to report, in one line.
    try:
        layer = spec.make("float32", implementation)
    except Exception as error:  # noqa: BLE001
        raise LayerError(f"{spec.name} rejected its arguments {spec.args_text()}: "
                         f"{_first_line(error)}") from None
    try:
        spec.build(layer, spec.input_shapes)
    except Exception as error:  # noqa: BLE001
        what = ("an input of shape " + str(spec.input_shapes[0]) if len(spec.input_shapes) == 1
                else "inputs of shapes " + "; ".join(str(s) for s in spec.input_shapes))
        raise LayerError(f"layer {spec.name} cannot take {what}: {_first_line(error)}") from None


def parse_input_shape(text: str) -> Shapes:
    """``"64,128"`` or ``"64x128"`` for one input; ``"8,64;8,32"`` for two. ValueError if bad."""
    shapes = []
    for part in text.split(";"):
        dims = [d.strip() for d in part.replace("x", ",").split(",") if d.strip()]
        if not dims:
            raise ValueError(f"expected comma-separated dimensions, got {text!r}")
        shape = []
        for d in dims:
            if not d.isdigit() or int(d) <= 0:
                raise ValueError(f"invalid input dimension {d!r} (expected positive integers)")
            shape.append(int(d))
        shapes.append(tuple(shape))
    return tuple(shapes)


def parse_layer_args(text: str) -> dict:
    """A JSON object of constructor arguments; ValueError if it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error}); expected an object such as "
                         "'{\"units\": 64}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object of constructor arguments such as "
                         f"'{{\"units\": 64}}', got {type(value).__name__} {text!r}")
    return value
