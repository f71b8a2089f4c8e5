"""What every fastlayers layer shares: the ``implementation`` argument and registration."""

from __future__ import annotations

import numbers

import keras

from fastlayers.kernels import dispatch

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
