"""Profiler traces of fastlayers layers, for TensorBoard's Profile tab.

Every kernel runs under the name scope ``fastlayers/<kernel>/<implementation>``
(and, in eager mode, a profiler ``Trace`` event of that name), so the trace
viewer finds each kernel call by searching for ``fastlayers/``. Example::

    from fastlayers.bench.profile import profile_layer
    result = profile_layer("Dense", "/tmp/logs", input_shape=(4096, 1024))
    print(result.scopes)  # {'fastlayers/dense/xla'}

then ``tensorboard --logdir /tmp/logs`` and open Profile > trace_viewer. Each
capture is a run named after the layer's class (``/tmp/logs/Dense``), so the
captures of several layers in one log directory are told apart.

A layer of your own is named ``module:Class`` (or passed as the class), with its
constructor arguments and input shape; a ``CompiledLayer``'s kernel scope is
``fastlayers/<snake_case class name>/<implementation>``::

    result = profile_layer("my_layers:MyDense", "/tmp/logs", input_shape=(64, 128),
                           layer_args={"units": 256}, implementation="xla")
    print(result.scopes)  # {'fastlayers/my_dense/xla'}
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Sequence

import keras
import tensorflow as tf
from fastlayers.bench import cases, layer_spec
from fastlayers.bench.errors import CommandError
from fastlayers.bench.layer_spec import SCOPE_PATTERN, call_on_input
from fastlayers.kernels import dispatch


# A compiled kernel's function and XLA program name (``dispatch.function_name``).
FUNCTION_PATTERN = re.compile(r"fastlayers__([A-Za-z0-9_.]+?)__(graph|xla)_")
WARMUP_STEPS = 2


class ProfileError(CommandError):
    """Bad input or an unwritable log directory: reported as one line."""


@dataclasses.dataclass(frozen=True)
class ProfileResult:
    """Where a capture went and which kernel scopes it holds.

    Attributes:
        logdir: the directory to give ``tensorboard --logdir``.
        run: the TensorBoard run, named after the layer's class (``Dense``,
            ``MyDense``): ``<logdir>/<run>``.
        run_dir: ``<logdir>/<run>/plugins/profile/<session>``, this capture's
            directory (a session is named by the second it started).
        xplane_path: the captured trace (``<host>.xplane.pb``).
        scopes: the ``fastlayers/<kernel>/<implementation>`` names found in it.
    """

    logdir: str
    run: str
    run_dir: str
    xplane_path: str
    scopes: frozenset[str]


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


def _sessions(run_logdir: str) -> set[str]:
    root = os.path.join(run_logdir, "plugins", "profile")
    return set(os.listdir(root)) if os.path.isdir(root) else set()


def trace_scopes(xplane_path: str) -> frozenset[str]:
    """The ``fastlayers/<kernel>/<implementation>`` names in a captured ``.xplane.pb``.

    They appear as event names (eager ``Trace`` events), in TF op names (graph
    ops, ``long_name`` in the trace viewer), in the ``name`` of the op that
    launches an XLA cluster inside a ``tf.function``, and as the function or XLA
    program name ``fastlayers__<kernel>__<implementation>`` (the ``hlo_module``
    of every XLA op event).
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    # Only what the captured events name: a plane's metadata also describes every
    # XLA program compiled earlier in the process, run during the capture or not.
    texts = []
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                metadata = plane.event_metadata.get(event.metadata_id)
                if metadata is not None:
                    texts += [metadata.name, metadata.display_name]
                for stat in event.stats:
                    if stat.str_value:
                        texts.append(stat.str_value)
                    elif stat.HasField("ref_value") and stat.ref_value in plane.stat_metadata:
                        texts.append(plane.stat_metadata[stat.ref_value].name)
    scopes = {match for text in texts for match in SCOPE_PATTERN.findall(text)}
    scopes |= {dispatch.scope_name(kernel, implementation)
               for text in texts for kernel, implementation in FUNCTION_PATTERN.findall(text)}
    return frozenset(scopes)


def profile_layer(
    layer,
    logdir: str,
    *,
    input_shape: Sequence | None = None,
    layer_args: dict | None = None,
    policy: str = "float32",
    implementation=None,
    mode: str = "eager",
    device: str = "cpu",
    steps: int = 5,
) -> ProfileResult:
    """Runs warm steps of a layer (or model) and captures a profiler trace.

    Args:
        layer: a fastlayers layer name (``"Dense"``), ``"module:Class"`` or a Keras
            layer class (resolved by ``fastlayers.bench.layer_spec.resolve_layer``),
            or a Keras layer or model object.
        logdir: TensorBoard log directory; the trace goes to the run named after
            the layer's class, ``<logdir>/<Class>/plugins/profile/<session>/<host>.xplane.pb``,
            so that captures of several layers in one ``logdir`` are told apart.
        input_shape: the input's shape, or one shape per input, batch axis first;
            defaults to the layer's row of ``LAYER_DEFAULTS`` (required for any
            other layer).
        layer_args: constructor arguments of a layer given by name or class (for a
            fastlayers layer they update its ``LAYER_DEFAULTS`` row).
        policy: Keras dtype policy of a layer given by name or class.
        implementation: None (auto), ``"reference"``, ``"graph"``, ``"xla"`` or ``"native"``,
            for a ``FastLayer`` given by name or class.
        mode: ``"eager"`` (layer calls) or ``"function"`` (calls in a tf.function).
        device: ``"cpu"`` or ``"gpu"``.
        steps: profiled steps, after ``WARMUP_STEPS`` unprofiled ones.

    Returns:
        A :class:`ProfileResult`.

    Raises:
        fastlayers.bench.layer_spec.LayerError: the layer cannot be resolved,
            built or called on ``input_shape``.
        ProfileError: a failing call, an unwritable ``logdir``, no GPU.
    """
    if mode not in cases.MODES:
        raise ProfileError(f"unknown mode {mode!r} (choose from {', '.join(cases.MODES)})")
    if device == "gpu" and not cases.gpu_available():
        raise ProfileError("gpu requested but no GPU is visible to TensorFlow")
    if isinstance(layer, keras.layers.Layer):
        if layer_args:
            raise ProfileError("`layer_args` construct a layer given by name or class, "
                               f"not the layer object {layer.name!r}")
        call, shapes = call_on_input, layer_spec.normalize_shapes(input_shape)
        if not shapes:
            raise ProfileError("an input shape is needed (`--input-shape`, e.g. 4096,1024)")
    else:
        spec = layer_spec.resolve_layer(layer, input_shape=input_shape, layer_args=layer_args)
        if implementation is not None and not spec.dispatches:
            raise ProfileError(
                f"`--implementation {implementation}` needs a fastlayers layer (a FastLayer "
                f"or CompiledLayer); {spec.name} is a plain Keras layer, profiled as it is")
        call, shapes = spec.call, spec.input_shapes
        try:
            layer = spec.make(policy, implementation)
            spec.build(layer, shapes, policy)
        except ValueError as error:
            raise ProfileError(str(error).splitlines()[0]) from None
    run = type(layer).__name__
    created = _prepare_logdir(logdir)
    logdir = os.path.abspath(logdir)
    run_logdir = os.path.join(logdir, run)
    run_existed, before = os.path.exists(run_logdir), _sessions(run_logdir)
    started = False
    try:
        with tf.device(cases.tf_device(device)):
            x = layer_spec.random_inputs(shapes, policy)

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
                    f"{layer_spec.format_shapes(shapes)}: {str(error).splitlines()[0]}"
                ) from None
            tf.profiler.experimental.start(run_logdir)
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
        for session in _sessions(run_logdir) - before:
            shutil.rmtree(os.path.join(run_logdir, "plugins", "profile", session),
                          ignore_errors=True)
        if not run_existed:
            shutil.rmtree(run_logdir, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    # Sessions are named by the second they start: a capture in the same second as an
    # earlier one adds its trace to that session's directory.
    traces = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(run_logdir, "plugins", "profile"))
        for name in names
        if name.endswith(".xplane.pb")
    ]
    xplane_path = max(traces, key=os.path.getmtime)
    return ProfileResult(
        logdir, run, os.path.dirname(xplane_path), xplane_path, trace_scopes(xplane_path)
    )
