"""What every fastlayers layer shares: the ``implementation`` argument and registration."""

from __future__ import annotations

import functools
import re
import threading
import types

import keras
import tensorflow as tf

from fastlayers.kernels import dispatch
from fastlayers.kernels.auto import DEFAULT
from fastlayers.kernels.validation import check_positive_int  # noqa: F401 (the layers' import)

PACKAGE = "fastlayers"


def register(cls):
    """Registers a layer for ``.keras`` files, loadable with ``safe_mode=True``."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)


def get_activation(activation):
    """``keras.activations.get`` with an error that names the argument."""
    try:
        return keras.activations.get(activation)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "Received an invalid value for `activation`, expected the name of a Keras "
            f"activation, a callable or None. Received: activation={activation!r}"
        ) from error


class KerasQuantization:
    """Mixin of the drop-ins that subclass a layer Keras quantizes (Dense,
    EinsumDense). Keras refuses to quantize subclasses of its layers, whose
    computation it cannot vouch for; ours compute Keras's, so the refusal moves down
    one level: a subclass of ours is refused, as Keras refuses one of its own."""

    def quantize(self, mode=None, type_check=True, config=None):
        if type_check and KerasQuantization not in type(self).__bases__:
            raise self._not_implemented_error(self.quantize)
        super().quantize(mode, type_check=False, config=config)


class ImplementationArgument:
    """The ``implementation=`` constructor argument of a fastlayers layer, checked and
    kept in ``get_config()``; mixed in before the Keras layer class it extends."""

    def __init__(self, *args, implementation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.implementation = dispatch.check_implementation(implementation)

    def get_config(self):
        return {**super().get_config(), "implementation": self.implementation}


class FastLayer(ImplementationArgument, keras.layers.Layer):
    """A Keras layer whose computation dispatches through ``implementation=``.

    Args:
        implementation: None (auto: this machine's tuned choice where
            ``fastlayers tune`` or ``FASTLAYERS_AUTOTUNE=1`` measured one, else the
            table's for the device and dtype), ``"reference"``, ``"graph"``,
            ``"xla"`` or ``"native"`` (where the kernel has one). Kept in
            ``get_config()``.
    """


class CompiledLayer(FastLayer):
    """Write ``build`` and a reference ``call``; get the compiled paths and the plumbing.

    A subclass's ``call`` is the reference: plain TF or ``keras.ops`` code. The class
    turns it into a kernel with ``"graph"`` and ``"xla"`` paths behind
    ``implementation=`` (auto by this machine's tuning cache, then
    ``fastlayers.kernels.auto.DEFAULT`` or the class's ``auto`` row), selected for
    the layer's compute dtype; the tuner keys its records by the class, the input
    and the weights' shapes. It registers the class for
    ``.keras`` files under Keras's default package, ``"Custom"``, as
    ``keras.saving.register_keras_serializable()`` does (``package=`` in the class
    statement names another), so a file saved while the class lived in a notebook
    loads once the class has moved into a module: import the module that defines it
    before ``keras.saving.load_model``. As with Keras's decorator, two classes of one
    name in one package overwrite each other's registration (the last one wins when
    a file loads): give one of them its own ``package=``. It derives ``get_config`` from the
    constructor's arguments when they are plain values (str, int, float, bool, None,
    and lists or dicts of them); a layer taking other objects writes its own.
    Keras's dtype policies apply as to any layer: inputs and weights arrive in the
    compute dtype, variables stay in the variable dtype.

    Example:

    ```python
    class MyDense(fastlayers.layers.CompiledLayer):
        def __init__(self, units, activation=None, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.activation = keras.activations.get(activation)

        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], self.units))
            self.bias = self.add_weight(shape=(self.units,), initializer="zeros")

        def call(self, x):
            return self.activation(x @ self.kernel + self.bias)
    ```

    Class attributes a subclass may set:
        auto: its auto row (``{(platform, dtype name or "*"): (implementation, ...)}``),
            checked when the layer is first called.
        upcast: True runs float16/bfloat16 calls in float32 (inputs and weights cast
            up, outputs cast back), which gives a ``call`` written without care for
            precision the float32 accumulation of the precision contract.

    A subclass may override
    ``not_supported_reasons(implementation, *, platform, dtype, **options)``.
    A subclass of a subclass may call ``super().call(...)``: the outermost ``call``
    dispatches and the inner one runs inside it.
    """

    auto = None
    upcast = False

    def __init_subclass__(cls, package="Custom", **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("auto") is not None:
            dispatch.check_auto_row(cls.auto, cls.__name__)
        if "call" in cls.__dict__:
            dispatch.check_option_names(cls.__dict__["call"], f"{cls.__name__}.call")
            cls.call = _dispatching(cls.__dict__["call"])
        keras.saving.register_keras_serializable(package=package)(cls)

    def not_supported_reasons(self, implementation, *, platform, dtype, **options):
        """Why ``implementation`` cannot run this layer's call; empty when it can."""
        return []

    def get_config(self):
        config = super().get_config()
        if type(self).get_config is not CompiledLayer.get_config:
            return config  # a subclass's own get_config adds its arguments
        captured = getattr(self, "_auto_config", None)
        if captured is None:
            raise NotImplementedError(
                f"{type(self).__name__} takes constructor arguments that are not plain "
                "values (str, int, float, bool, None, lists or dicts of them), so its "
                "config cannot be derived: override get_config() to serialize them."
            )
        return {**captured.config, **config}


# The layers (by id) whose reference call is running on this thread: a call made
# inside one, such as a subclass's ``super().call(...)``, is part of it.
_RUNNING = threading.local()


def _running() -> set[int]:
    if not hasattr(_RUNNING, "layers"):
        _RUNNING.layers = set()
    return _RUNNING.layers


def _dispatching(reference_call):
    """Wraps a reference ``call`` so it runs through a per-layer ``Kernel``.

    The outermost call dispatches; a ``super().call(...)`` inside a subclass's
    reference is part of that reference and runs as plain code, so one kernel (and
    one compiled function) serves the whole call. Other threads calling the same
    layer meanwhile dispatch on their own.
    """

    def reference(self, *args, **kwargs):
        running = _running()
        running.add(id(self))
        try:
            if not (self.upcast and self.compute_dtype in ("float16", "bfloat16")):
                return reference_call(self, *args, **kwargs)
            # Inputs and variables in float32; floating outputs back in the compute dtype.
            from keras.src.backend import AutocastScope  # Layer.__call__'s; not exported

            args, kwargs = dispatch.cast_floating((args, kwargs), tf.float32)
            with AutocastScope("float32"):
                outputs = reference_call(self, *args, **kwargs)
            return dispatch.cast_floating(outputs, self.compute_dtype)
        finally:
            running.discard(id(self))

    @functools.wraps(reference_call)
    def call(self, *args, **kwargs):
        if id(self) in _running():
            return reference_call(self, *args, **kwargs)
        kernels = self.__dict__.setdefault("_fastlayers_kernels", {})
        kernel = kernels.get(reference_call)
        if kernel is None:
            kernel = kernels[reference_call] = dispatch.Kernel(
                _snake_case(type(self).__name__),
                types.MethodType(reference, self),
                auto=self.auto or DEFAULT,
                not_supported_reasons=self.not_supported_reasons,
                signature=functools.partial(_layer_signature, self),
            )
        return kernel.apply(
            args, kwargs, implementation=self.implementation, dtype=self.compute_dtype
        )

    return call


def _layer_signature(layer, *args, **kwargs):
    """A layer call's tuning key: its inputs' (as any kernel's) and its weights' shapes,
    which its constructor arguments decide (two ``MyDense`` of other widths differ)."""
    bucket, flags = dispatch.default_signature(*args, **kwargs)
    flags["weights"] = [list(weight.shape) for weight in layer.weights]
    return bucket, flags


def _snake_case(name: str) -> str:
    # MyDense -> my_dense, NoXLA -> no_xla, XLAPool -> xla_pool
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
