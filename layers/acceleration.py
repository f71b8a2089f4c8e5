"""``accelerate(model)``: a copy of a Keras model with fastlayers' drop-ins in place of Keras's layers."""

from __future__ import annotations

import collections
import dataclasses

import keras
from keras.src.models.functional import Functional  # what keras.Model(inputs, outputs) builds

# Names of the layers fastlayers has a drop-in for: ``keras.layers.<name>`` becomes
# ``fastlayers.layers.<name>`` (same constructor arguments and weights). A name
# fastlayers.layers does not (yet) define is skipped, so one line adds a layer.
DROP_INS = (
    "Dense",
    "MultiHeadAttention",
    "MaxPooling2D",
    "LayerNormalization",
    "RMSNormalization",
    "GroupQueryAttention",
)


def drop_ins() -> dict[type, type]:
    """``{Keras's layer class: fastlayers' drop-in}`` for every name in ``DROP_INS``."""
    from fastlayers import layers  # the package imports this module

    table = {}
    for name in DROP_INS:
        theirs, ours = getattr(keras.layers, name, None), getattr(layers, name, None)
        if theirs is not None and ours is not None:
            table[theirs] = ours
    return table


@dataclasses.dataclass
class _Report:
    """What ``accelerate`` did to each layer, for the summary it prints."""

    replaced: list = dataclasses.field(default_factory=list)
    kept: list = dataclasses.field(default_factory=list)
    cloned: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def summary(self, model) -> str:
        total = len(self.replaced) + len(self.kept) + sum(self.cloned.values())
        lines = [
            f"accelerate({model.name!r}): {len(self.replaced)} of {total} layers replaced "
            "by fastlayers drop-ins"
        ]
        for layer, ours in self.replaced:
            lines.append(
                f"  replaced  {layer.name}: keras.layers.{type(layer).__name__} -> "
                f"fastlayers.layers.{ours.__name__}"
            )
        for layer, reason in self.kept:
            lines.append(f"  kept      {layer.name}: keras.layers.{type(layer).__name__} ({reason})")
        if self.cloned:
            others = ", ".join(f"{name} x{count}" for name, count in sorted(self.cloned.items()))
            lines.append(f"  cloned unchanged (no drop-in): {others}")
        return "\n".join(lines)


def accelerate(model, verbose=True):
    """A copy of ``model`` with fastlayers' drop-ins in place of Keras's layers.

    Every layer whose class is exactly one of Keras's layers with a fastlayers
    drop-in (``DROP_INS``: Dense, MultiHeadAttention, MaxPooling2D,
    LayerNormalization, RMSNormalization, GroupQueryAttention when fastlayers has
    it) becomes the drop-in, built from the same config and holding a copy of the
    same weights; every other layer is cloned unchanged with its weights, and
    nested Sequential and functional models are copied the same way. A layer
    using what the drop-in does not take (its constructor refuses the config) stays
    Keras's, and the summary says why. Subclasses of Keras's layers are kept, as
    they may change what the layer computes.

    The original model is not changed. The copy predicts what the original does
    (within ``fastlayers.kernels.precision.TOLERANCES``), trains, and saves to and
    loads from ``.keras`` files in safe mode. If the original was compiled, the copy
    is compiled with the same configuration (optimizer, loss, metrics); the
    optimizer's state is not copied, as with ``keras.models.clone_model``.

    Args:
        model: a functional or Sequential ``keras.Model``.
        verbose: print a summary of the replaced and kept layers.

    Returns:
        The new model.

    Raises:
        ValueError: if ``model`` is not a Keras model, or is a subclassed model
            (its layers are not known to Keras, which cannot clone it), or holds one.

    Example:

    >>> fast = fastlayers.layers.accelerate(model)
    accelerate('classifier'): 7 of 12 layers replaced by fastlayers drop-ins
    ...
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "Received an invalid value for `model`, expected a functional or Sequential "
            f"keras.Model. Received: model={model!r} of type {type(model).__name__}"
        )
    _check_cloneable(model)
    if not isinstance(verbose, bool):
        raise ValueError(
            f"Received an invalid value for `verbose`, expected True or False. "
            f"Received: verbose={verbose!r}"
        )
    table = drop_ins()
    report = _Report()
    pairs = []

    def clone(layer):
        copy = _clone_layer(layer, table, report)
        pairs.append((layer, copy))
        return copy

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for original, new in pairs:
        _copy_weights(original, new)
    if model.compiled:
        copy.compile_from_config(model.get_compile_config())
    if verbose:
        print(report.summary(model))
    return copy


def _check_cloneable(model, path=()):
    where = " > ".join((*path, model.name))
    if not isinstance(model, (keras.Sequential, Functional)):
        raise ValueError(
            f"accelerate() cannot copy the subclassed model {where!r} "
            f"({type(model).__name__}): Keras cannot clone a subclassed model, whose "
            "layers and their connections live in its Python code. Build it from "
            "fastlayers.layers in its code instead (the layers take the same "
            "arguments), or rebuild it as a functional or Sequential model and "
            "accelerate that."
        )
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            _check_cloneable(layer, (*path, model.name))


def _clone_layer(layer, table, report):
    ours = table.get(type(layer))
    config = layer.get_config()
    if ours is not None:
        try:
            replacement = ours.from_config(config)
        except (ValueError, TypeError) as error:
            # Keras's from_config wraps the constructor's error after this marker.
            reason = str(error).rsplit("Exception encountered: ", 1)[-1].strip()
            report.kept.append((layer, reason.split("\n")[0]))
        else:
            report.replaced.append((layer, ours))
            return replacement
    elif isinstance(layer, keras.layers.Layer):  # not an op such as `x + y` on Keras tensors
        report.cloned[type(layer).__name__] += 1
    return type(layer).from_config(config)


def _copy_weights(original, new):
    if not isinstance(original, keras.layers.Layer) or not original.built:
        return
    if not new.built:
        new.build_from_config(original.get_build_config())
    weights = original.get_weights()
    shapes = [tuple(w.shape) for w in weights]
    new_shapes = [tuple(w.shape) for w in new.weights]
    if shapes != new_shapes:
        raise ValueError(
            f"accelerate() could not copy the weights of layer {original.name!r}: the "
            f"copy's weights have shapes {new_shapes}, the original's {shapes}."
        )
    new.set_weights(weights)
