"""What every fastlayers layer shares: the ``implementation`` argument and registration."""

from __future__ import annotations

import functools
import numbers
import re
import types

import keras

from fastlayers.kernels import dispatch
from fastlayers.kernels.auto import DEFAULT

PACKAGE = "fastlayers"


def register(cls):
    """Registers a layer for ``.keras`` files, loadable with ``safe_mode=True``."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)


def check_positive_int(name: str, value) -> int:
    """Returns ``value`` as an int if it is a positive integer (not a bool); else raises."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive integer. "
            f"Received: {name}={value!r}"
        )
    return int(value)


def get_activation(activation):
    """``keras.activations.get`` with an error that names the argument."""
    try:
        return keras.activations.get(activation)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "Received an invalid value for `activation`, expected the name of a Keras "
            f"activation, a callable or None. Received: activation={activation!r}"
        ) from error


class FastLayer(keras.layers.Layer):
    """A Keras layer whose computation dispatches through ``implementation=``.

    Args:
        implementation: None (auto: the fastest for the device and dtype),
            ``"reference"``, ``"graph"`` or ``"xla"``. Kept in ``get_config()``.
    """

    def __init__(self, *, implementation=None, **kwargs):
        super().__init__(**kwargs)
        self.implementation = dispatch.check_implementation(implementation)

    def get_config(self):
        return {**super().get_config(), "implementation": self.implementation}


class CompiledLayer(FastLayer):
    """Write ``build`` and a reference ``call``; get the compiled paths and the plumbing.

    A subclass's ``call`` is the reference: plain TF or ``keras.ops`` code. The class
    turns it into a kernel with ``"graph"`` and ``"xla"`` paths behind
    ``implementation=`` (auto by ``fastlayers.kernels.auto.DEFAULT``, or the class's
    ``auto`` row), registers the class for ``.keras`` files (package: the class's
    module, or ``package=`` in the class statement), and derives ``get_config`` from
    the constructor's arguments when they are plain values (str, int, float, bool,
    None, and lists or dicts of them); a layer taking other objects writes its own.
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

    Subclasses may set ``auto`` (an auto row) and override
    ``not_supported_reasons(implementation, *, platform, dtype, **options)``.
    """

    auto = None

    def __init_subclass__(cls, package=None, **kwargs):
        super().__init_subclass__(**kwargs)
        if "call" in cls.__dict__:
            cls.call = _dispatching(cls.__dict__["call"])
        keras.saving.register_keras_serializable(package=package or cls.__module__)(cls)

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


def _dispatching(reference_call):
    """Wraps a reference ``call`` so it runs through a per-layer ``Kernel``."""

    @functools.wraps(reference_call)
    def call(self, *args, **kwargs):
        kernel = self.__dict__.get("_fastlayers_kernel")
        if kernel is None or kernel.reference.__func__ is not reference_call:
            kernel = dispatch.Kernel(
                _snake_case(type(self).__name__),
                types.MethodType(reference_call, self),
                auto=self.auto or DEFAULT,
                not_supported_reasons=self.not_supported_reasons,
            )
            self.__dict__["_fastlayers_kernel"] = kernel
        return kernel(*args, implementation=self.implementation, **kwargs)

    return call


def _snake_case(name: str) -> str:
    # MyDense -> my_dense, NoXLA -> no_xla, XLAPool -> xla_pool
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()
