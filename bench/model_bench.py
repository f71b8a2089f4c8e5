"""``fastlayers bench --model FILE.keras``: a model against its accelerated copy.

The copy is ``fastlayers.layers.accelerate(model)``. Two steps are timed for each:

- ``predict``: a forward call with ``training=False`` inside a ``tf.function``,
  what ``model.predict`` runs per batch, without its data pipeline;
- ``train step``: ``model.train_on_batch`` (Keras's own training ``tf.function``),
  with the model's optimizer (Adam when the file holds an uncompiled model) and a
  mean squared error against random targets of the outputs' shapes; the loss is
  the same for both models and costs nothing next to the layers.

Both models run under the dtype policies their layers were saved with. Floating
inputs are standard normal; integer inputs (token ids) are zeros, a valid id for
any embedding. The two models are timed in interleaved rounds (as every
``fastlayers bench`` row), each figure a median of them.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys

import keras
import numpy as np
import tensorflow as tf
from fastlayers.bench import runner
from fastlayers.bench.errors import CommandError

DEFAULT_BATCH = 32
STEPS = ("predict", "train step")


class ModelError(CommandError):
    """A model file that cannot be loaded, accelerated or fed: reported as one line."""


@dataclasses.dataclass
class ModelResult:
    """One step's median seconds for the original and the accelerated copy."""

    step: str
    original: float
    accelerated: float

    @property
    def speedup(self) -> float:
        return self.original / self.accelerated


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def load(path) -> keras.Model:
    """The model in a ``.keras`` file, loaded in safe mode; ModelError if it cannot be."""
    if not str(path).endswith(".keras"):
        raise ModelError(f"expected a .keras file (model.save('model.keras')). Received: {path}")
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as error:  # noqa: BLE001 — whatever loading raises is the answer
        raise ModelError(f"cannot load {path}: {_first_line(error)}") from None


def input_shapes(model, given=None) -> tuple[tuple[int, ...], ...]:
    """One shape per model input: ``given`` (batch first), else the model's with a batch of 32."""
    inputs = model.inputs
    if given is not None:
        shapes = tuple(tuple(shape) for shape in given)
        if len(shapes) != len(inputs):
            raise ModelError(f"model {model.name!r} has {len(inputs)} input(s); --input-shape "
                             f"gave {len(shapes)}: {shapes}")
        for shape, tensor in zip(shapes, inputs):
            expected = tuple(tensor.shape)
            fits = len(shape) == len(expected) and all(
                e is None or e == s for s, e in zip(shape[1:], expected[1:]))
            if not fits:
                raise ModelError(f"input shape {shape} does not fit model input "
                                 f"{tensor.name!r} of shape {expected}")
        return shapes
    shapes = []
    for tensor in inputs:
        shape = (DEFAULT_BATCH, *tensor.shape[1:])
        if None in shape:
            raise ModelError(f"model input {tensor.name!r} has shape {tuple(tensor.shape)}: "
                             "give its size with --input-shape (batch first, e.g. 32,128)")
        shapes.append(shape)
    return tuple(shapes)


def _inputs(model, shapes):
    rng = np.random.default_rng(0)
    tensors = []
    for tensor, shape in zip(model.inputs, shapes):
        dtype = tf.as_dtype(tensor.dtype)
        if dtype.is_floating:
            tensors.append(tf.constant(rng.standard_normal(shape), dtype))
        else:
            tensors.append(tf.zeros(shape, dtype))
    return tensors[0] if len(tensors) == 1 else tensors


def _targets(model, inputs):
    outputs = tf.nest.flatten(model(inputs, training=False))
    rng = np.random.default_rng(1)
    targets = [tf.constant(rng.standard_normal(o.shape), "float32") for o in outputs]
    return targets[0] if len(targets) == 1 else targets


def _compile_for_training(model, source):
    optimizer = (keras.optimizers.deserialize(keras.optimizers.serialize(source.optimizer))
                 if source.compiled and source.optimizer is not None else "adam")
    model.compile(optimizer=optimizer, loss="mse")


def steps(model, inputs, targets):
    """``{step name: callable}`` for one model: a predict call and a training step."""
    forward = tf.function(lambda x: model(x, training=False))

    def predict():
        return tf.nest.map_structure(lambda t: t.numpy(), forward(inputs))

    def train():
        return model.train_on_batch(inputs, targets)

    return {"predict": predict, "train step": train}


def bench_model(model, shapes=None, *, repeats=5, verbose=True) -> list[ModelResult]:
    """Times ``model`` against ``fastlayers.layers.accelerate(model)``.

    Args:
        model: a functional or Sequential Keras model, or the path of a ``.keras`` file.
        shapes: one input shape per model input, batch first (default: the model's
            input shapes with a batch of 32).
        repeats: interleaved timed rounds; each figure is their median.
        verbose: print what ``accelerate`` replaced.

    Returns:
        One :class:`ModelResult` per step (``STEPS``).

    Raises:
        ModelError: the file does not load, the model cannot be accelerated, or the
            shapes do not fit its inputs.
    """
    from fastlayers import layers

    if not isinstance(model, keras.Model):
        model = load(model)
    shapes = input_shapes(model, shapes)
    try:
        fast = layers.accelerate(model, verbose=verbose)
    except ValueError as error:
        raise ModelError(_first_line(error)) from None
    inputs = _inputs(model, shapes)
    targets = _targets(model, inputs)
    original = keras.models.clone_model(model)  # trained here, so the file's model stays as loaded
    original.set_weights(model.get_weights())
    _compile_for_training(original, model)
    _compile_for_training(fast, model)
    runs = {"original": steps(original, inputs, targets), "accelerated": steps(fast, inputs, targets)}
    results = []
    for step in STEPS:
        calls = {}
        for name, run in runs.items():
            run[step]()  # trace, compile, allocate
            calls[name] = runner.calibrate(run[step])
        samples = {name: [] for name in runs}
        names = list(runs)
        for r in range(repeats):
            for name in names[r % 2:] + names[:r % 2]:
                samples[name].append(runner.sample(runs[name][step], calls[name]))
        results.append(ModelResult(step, statistics.median(samples["original"]),
                                   statistics.median(samples["accelerated"])))
    return results


def table(results, model_name: str, shapes) -> str:
    """The results as a text table: milliseconds per step and the speed-up."""
    shape_text = "; ".join("x".join(str(d) for d in shape) for shape in shapes)
    lines = [f"model {model_name!r}, input {shape_text}",
             f"{'step':<12}{'Keras layers':>14}{'accelerated':>14}{'speed-up':>10}"]
    for r in results:
        lines.append(f"{r.step:<12}{1e3 * r.original:>11.2f} ms{1e3 * r.accelerated:>11.2f} ms"
                     f"{r.speedup:>9.2f}x")
    return "\n".join(lines)


def main(args) -> int:
    """``fastlayers bench --model``: the parsed options in, the exit status out."""
    from fastlayers.bench import machine

    excluded = [option for option, value in (("--layer", args.layer), ("--suite", args.suite),
                                             ("--layer-args", args.layer_args)) if value]
    if excluded:
        raise ModelError(f"--model times one model; it does not take {', '.join(excluded)}")
    model = load(args.model)
    shapes = input_shapes(model, args.input_shape)
    print(f"fastlayers bench --model on {machine.machine_name(machine.machine_info())}",
          file=sys.stderr)
    results = bench_model(model, shapes, repeats=args.repeats, verbose=True)
    print(table(results, model.name, shapes))
    return 0


def keras_transformer_classifier(vocab=1000, length=256, width=256, heads=4, blocks=2,
                                 classes=10, name="transformer_classifier"):
    """A text classifier built from Keras layers only: the bench's model to accelerate.

    A token embedding scaled by the square root of the width, ``blocks`` pre-norm Transformer blocks
    (LayerNormalization, causal MultiHeadAttention, a GELU MLP of 4x the width),
    a final LayerNormalization, mean pooling and a softmax over ``classes``.
    """
    tokens = keras.Input((length,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocab, width)(tokens)
    x = x * width**0.5
    for _ in range(blocks):
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        h = keras.layers.MultiHeadAttention(heads, width // heads)(h, h, use_causal_mask=True)
        x = keras.layers.Add()([x, h])
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        h = keras.layers.Dense(4 * width, activation="gelu")(h)
        h = keras.layers.Dense(width)(h)
        x = keras.layers.Add()([x, h])
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    return keras.Model(tokens, outputs, name=name)
