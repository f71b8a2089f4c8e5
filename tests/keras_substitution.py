"""A pytest plugin that runs Keras's shipped layer tests with fastlayers' layers in place.

``FASTLAYERS_SUBSTITUTE="Dense,MultiHeadAttention"`` names the layers. Before the test
modules are collected, ``keras.layers.<Name>`` and ``keras.src.layers.<Name>`` (and
every alias of Keras's class there, such as ``MaxPool2D``) become fastlayers' class; a
test module that imported Keras's class by name gets ours in its namespace too. Used by
tests/contracts/test_keras_suites.py: ``python -m pytest -p keras_substitution <keras test file>``
with this folder on ``PYTHONPATH``.
"""

import os

# Keras's class -> ours, for the layers substituted in this process.
SUBSTITUTED = {}


def _replace_in(namespace, setter):
    for attribute, value in list(namespace.items()):
        if isinstance(value, type) and value in SUBSTITUTED:
            setter(attribute, SUBSTITUTED[value])


def pytest_configure(config):
    import keras
    from keras.src import layers as keras_src_layers

    from fastlayers import layers as ours

    names = [name for name in os.environ.get("FASTLAYERS_SUBSTITUTE", "").split(",") if name]
    if not names:
        raise ValueError(
            "Received an invalid value for `FASTLAYERS_SUBSTITUTE`, expected a comma-separated "
            f"list of fastlayers layer names. Received: FASTLAYERS_SUBSTITUTE={os.environ.get('FASTLAYERS_SUBSTITUTE')!r}"
        )
    for name in names:
        SUBSTITUTED[getattr(keras_src_layers, name)] = getattr(ours, name)
    for module in (keras.layers, keras_src_layers):
        _replace_in(vars(module), lambda attribute, value, module=module: setattr(module, attribute, value))


def pytest_collection_modifyitems(items):
    modules = {item.module for item in items if getattr(item, "module", None) is not None}
    for module in modules:
        _replace_in(vars(module), lambda attribute, value, module=module: setattr(module, attribute, value))
