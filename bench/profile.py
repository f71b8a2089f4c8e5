"""Profiler traces of fastlayers layers, for TensorBoard's Profile tab.

Every kernel runs under the name scope ``fastlayers/<kernel>/<implementation>``
(and, in eager mode, a profiler ``Trace`` event of that name), so the trace
viewer finds each kernel call by searching for ``fastlayers/``. Example::

    from fastlayers.bench.profile import profile_layer
    result = profile_layer("Dense", "/tmp/logs", input_shape=(4096, 1024))
    print(result.scopes)  # {'fastlayers/dense/xla'}

then ``tensorboard --logdir /tmp/logs`` and open Profile > trace_viewer.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Callable, Sequence

import tensorflow as tf
from fastlayers.bench import cases


def call_on_input(layer, x):
    return layer(x)


@dataclasses.dataclass(frozen=True)
class LayerDefaults:
    """A representative workload for a layer profiled by name.

    Attributes:
        args: constructor arguments.
        input_shape: the shape of the one input tensor.
        call: ``call(layer, x)``, how a step calls the layer on it (an attention
            layer, say, as ``layer(x, x)``).
    """

    args: dict
    input_shape: tuple[int, ...]
    call: Callable = call_on_input


LAYER_DEFAULTS: dict[str, LayerDefaults] = {
    "Dense": LayerDefaults({"units": 4096, "activation": "relu"}, (4096, 1024)),
    "Linear": LayerDefaults({"units": 4096}, (4096, 1024)),
}

SCOPE_PATTERN = re.compile(r"fastlayers/[A-Za-z0-9_.]+/(?:reference|graph|xla)\b")
WARMUP_STEPS = 2


class ProfileError(Exception):
    """Bad input or an unwritable log directory: reported as one line."""


@dataclasses.dataclass(frozen=True)
class ProfileResult:
    """Where a capture went and which kernel scopes it holds.

    Attributes:
        logdir: the directory to give ``tensorboard --logdir``.
        run_dir: ``<logdir>/plugins/profile/<run>``, one profile run.
        xplane_path: the captured trace (``<host>.xplane.pb``).
        scopes: the ``fastlayers/<kernel>/<implementation>`` names found in it.
    """

    logdir: str
    run_dir: str
    xplane_path: str
    scopes: frozenset[str]


def layer_names() -> list[str]:
    """The fastlayers layers that can be profiled by name."""
    from fastlayers import layers

    return sorted(
        name for name in getattr(layers, "__all__", dir(layers))
        if isinstance(getattr(layers, name, None), type)
        and issubclass(getattr(layers, name), layers.FastLayer)
        and getattr(layers, name) is not layers.FastLayer
    )


def build_layer(name: str, *, policy: str = "float32", implementation=None):
    """A fastlayers layer by name, with its ``LAYER_DEFAULTS`` constructor arguments."""
    from fastlayers import layers

    if name not in layer_names():
        raise ProfileError(
            f"unknown layer {name!r}; fastlayers.layers has {', '.join(layer_names())}"
        )
    if name not in LAYER_DEFAULTS:
        raise ProfileError(
            f"layer {name!r} has no row in fastlayers.bench.profile.LAYER_DEFAULTS "
            "(constructor arguments and input shape)"
        )
    args = dict(LAYER_DEFAULTS[name].args)
    return getattr(layers, name)(**args, implementation=implementation, dtype=policy)


def _prepare_logdir(logdir: str) -> str | None:
    """Creates ``logdir``; returns the topmost directory created (None if it existed)."""
    logdir = os.path.abspath(logdir)
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise ProfileError(f"`--logdir` {logdir} exists and is not a directory")
    top = logdir
    while not os.path.exists(os.path.dirname(top)) and os.path.dirname(top) != top:
        top = os.path.dirname(top)
    created = None if os.path.exists(logdir) else top
    try:
        os.makedirs(logdir, exist_ok=True)
    except OSError as error:
        raise ProfileError(f"`--logdir` {logdir} cannot be created: {error.strerror}") from None
    if not os.access(logdir, os.W_OK | os.X_OK):
        raise ProfileError(f"`--logdir` {logdir} is not writable")
    return created


def _runs(logdir: str) -> set[str]:
    root = os.path.join(logdir, "plugins", "profile")
    return set(os.listdir(root)) if os.path.isdir(root) else set()


def trace_scopes(xplane_path: str) -> frozenset[str]:
    """The ``fastlayers/<kernel>/<implementation>`` names in a captured ``.xplane.pb``.

    They appear as event names (eager ``Trace`` events), in TF op names (graph
    ops, ``long_name`` in the trace viewer), and in the ``name`` of the op that
    launches an XLA cluster inside a ``tf.function``.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    texts = []
    for plane in space.planes:
        texts += [m.name for m in plane.event_metadata.values()]
        texts += [m.display_name for m in plane.event_metadata.values()]
        texts += [m.name for m in plane.stat_metadata.values()]
        for line in plane.lines:
            for event in line.events:
                texts += [s.str_value for s in event.stats if s.str_value]
    return frozenset(match for text in texts for match in SCOPE_PATTERN.findall(text))


def profile_layer(
    layer,
    logdir: str,
    *,
    input_shape: Sequence[int] | None = None,
    policy: str = "float32",
    implementation=None,
    mode: str = "eager",
    device: str = "cpu",
    steps: int = 5,
) -> ProfileResult:
    """Runs warm steps of a layer (or model) and captures a profiler trace.

    Args:
        layer: a fastlayers layer name (``"Dense"``), or a Keras layer or model.
        logdir: TensorBoard log directory; the trace goes to
            ``<logdir>/plugins/profile/<run>/<host>.xplane.pb``.
        input_shape: the input's shape; defaults to the layer's row of
            ``LAYER_DEFAULTS`` (required for a layer or model object).
        policy: Keras dtype policy of a layer built by name.
        implementation: None (auto), ``"reference"``, ``"graph"`` or ``"xla"``,
            for a layer built by name.
        mode: ``"eager"`` (layer calls) or ``"function"`` (calls in a tf.function).
        device: ``"cpu"`` or ``"gpu"``.
        steps: profiled steps, after ``WARMUP_STEPS`` unprofiled ones.

    Returns:
        A :class:`ProfileResult`.

    Raises:
        ProfileError: unknown layer, bad shape, unwritable ``logdir``, no GPU.
    """
    if mode not in cases.MODES:
        raise ProfileError(f"unknown mode {mode!r} (choose from {', '.join(cases.MODES)})")
    if device == "gpu" and not cases.gpu_available():
        raise ProfileError("gpu requested but no GPU is visible to TensorFlow")
    if isinstance(layer, str):
        name = layer
        try:
            layer = build_layer(name, policy=policy, implementation=implementation)
        except ValueError as error:
            raise ProfileError(str(error).splitlines()[0]) from None
        call = LAYER_DEFAULTS[name].call
        input_shape = input_shape or LAYER_DEFAULTS[name].input_shape
    else:
        call = call_on_input
    if not input_shape:
        raise ProfileError("an input shape is needed (`--input-shape`, e.g. 4096,1024)")
    created = _prepare_logdir(logdir)
    logdir = os.path.abspath(logdir)
    before = _runs(logdir)
    started = False
    try:
        with tf.device(cases.tf_device(device)):
            x = tf.cast(
                tf.random.stateless_normal(list(input_shape), seed=(0, 0)),
                cases.compute_dtype(policy),
            )

            def step():
                return call(layer, x)

            if mode == "function":
                step = tf.function(step)
            try:
                for _ in range(WARMUP_STEPS):
                    step()
            except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:
                raise ProfileError(
                    f"layer {layer.name!r} cannot take an input of shape "
                    f"{tuple(input_shape)}: {str(error).splitlines()[0]}"
                ) from None
            tf.profiler.experimental.start(logdir)
            started = True
            for number in range(steps):
                # step_num and _r=1 mark steps for the Profile tab's step-time views.
                with tf.profiler.experimental.Trace("fastlayers/step", step_num=number, _r=1):
                    step()
            tf.profiler.experimental.stop()
            started = False
    except BaseException:
        if started:
            tf.profiler.experimental.stop(warn=False)
        for run in _runs(logdir) - before:
            shutil.rmtree(os.path.join(logdir, "plugins", "profile", run), ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    # Runs are named by the second they start: a capture in the same second as an
    # earlier one adds its trace to that run's directory.
    traces = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(logdir, "plugins", "profile"))
        for name in names
        if name.endswith(".xplane.pb")
    ]
    xplane_path = max(traces, key=os.path.getmtime)
    return ProfileResult(
        logdir, os.path.dirname(xplane_path), xplane_path, trace_scopes(xplane_path)
    )
