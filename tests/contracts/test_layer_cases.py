"""Every public layer is in the cases the contract tests run for every layer."""

import keras
from layer_cases import LAYER_CASES

from fastlayers import layers


def public_layer_classes():
    """The layer classes of ``fastlayers.layers.__all__``, aliases once, bases left out."""
    return {getattr(layers, name) for name in layers.__all__
            if isinstance(getattr(layers, name), type)
            and issubclass(getattr(layers, name), keras.layers.Layer)
            and getattr(layers, name) not in (layers.FastLayer, layers.CompiledLayer)}


def test_every_public_layer_has_a_layer_cases_entry():
    covered = {type(case.make()) for case in LAYER_CASES}
    missing = sorted(cls.__name__ for cls in public_layer_classes() - covered)
    assert not missing, f"layers without a LAYER_CASES entry (tests/layer_cases.py): {missing}"


def test_layer_case_names_are_unique():
    names = [case.name for case in LAYER_CASES]
    assert len(names) == len(set(names)), names
