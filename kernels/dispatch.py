"""Implementation dispatch shared by every fastlayers kernel.

A kernel has one eager **reference** implementation (plain TF ops, the spec) and one
compiled algorithm that runs two ways: ``"graph"`` (``tf.function``; grappler and
oneDNN fusions on CPU) and ``"xla"`` (``tf.function(jit_compile=True)``).
``implementation=None`` (auto) takes the first implementation from the kernel's row
of the auto table (``fastlayers.kernels.auto``) that supports the call.

An implementation that cannot take a call says why, as a list of readable reasons.
An explicit request that cannot run raises a ValueError naming those reasons; only
auto moves on to the next entry of its row, and never past the end of it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
import sys
from collections.abc import Callable, Sequence

import tensorflow as tf
from fastlayers.kernels.auto import DEFAULT, EAGER_REFERENCE_BELOW_FLOPS
from fastlayers.kernels.precision import check_floating

# "native": a C++ op (``Kernel(native=...)``), for the kernels that ship one.
IMPLEMENTATIONS = ("reference", "graph", "xla", "native")

# Platforms the auto table distinguishes. On CPU the choice depends on which
# matmul library TensorFlow runs: Eigen (TF's default on CPUs without
# AVX512-VNNI/BF16/AMX), oneDNN, or oneDNN on a CPU with native bfloat16 dot products.
PLATFORMS = ("cpu", "cpu-onednn", "cpu-onednn-bf16", "gpu")


_SELECTING_AUTOMATICALLY = contextvars.ContextVar("selecting_automatically", default=False)


def selecting_automatically() -> bool:
    """Whether the current ``not_supported_reasons`` call comes from auto's walk of
    its row (True) or from an explicit request (False): an implementation that
    auto should pass over where an explicit request still runs (the native
    attention under a gradient tape) tells the two apart with this."""
    return _SELECTING_AUTOMATICALLY.get()


@contextlib.contextmanager
def _automatic_selection():
    token = _SELECTING_AUTOMATICALLY.set(True)
    try:
        yield
    finally:
        _SELECTING_AUTOMATICALLY.reset(token)


def scope_name(kernel: str, implementation: str) -> str:
    """The profiler scope of a kernel call: ``fastlayers/<kernel>/<implementation>``."""
    return f"fastlayers/{kernel}/{implementation}"


def function_name(kernel: str, implementation: str) -> str:
    """The name of a kernel's compiled ``tf.function``: ``fastlayers__<kernel>__<impl>``.

    TensorFlow names the function's graph ``__inference_<name>_<n>`` and XLA its
    program ``a_inference_<name>_<n>__.<m>``; every XLA op event in a profile
    carries that program name, so a trace names the kernel even when the profiler
    drops the event of the op that launched it (seen on a loaded machine).
    """
    return f"fastlayers__{kernel}__{implementation}"


def _renamed(fn: Callable, name: str) -> Callable:
    @functools.wraps(fn)
    def renamed(*args, **kwargs):
        return fn(*args, **kwargs)

    renamed.__name__ = renamed.__qualname__ = name
    return renamed


def check_implementation(implementation):
    """Returns ``implementation`` if it names an implementation or is None; else raises."""
    if implementation is None or implementation in IMPLEMENTATIONS:
        return implementation
    choices = ", ".join(["None"] + [repr(name) for name in IMPLEMENTATIONS])
    raise ValueError(
        "Received an invalid value for `implementation`, expected one of "
        f"{choices}. Received: implementation={implementation!r}"
    )


def check_auto_row(auto, kernel: str = "kernel") -> dict[tuple[str, str], tuple[str, ...]]:
    """Returns an auto row as a dict of tuples if every key and entry is valid; else raises.

    A row maps ``(platform, dtype name or "*")`` to a non-empty ordered sequence of
    implementations; platforms are ``PLATFORMS``.
    """
    try:
        items = list(dict(auto).items())
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"Received an invalid auto row for kernel {kernel!r}, expected a dict mapping "
            f"(platform, dtype name) to a tuple of implementations. Received: auto={auto!r}"
        ) from error
    row = {}
    for key, entries in items:
        problem = None
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
            problem = "a key is not a (platform, dtype name) pair of strings"
        elif key[0] not in PLATFORMS:
            problem = f"platform {key[0]!r} is not one of {', '.join(map(repr, PLATFORMS))}"
        elif key[1] != "*" and not _is_floating_dtype_name(key[1]):
            problem = f"dtype {key[1]!r} is not the name of a floating dtype (e.g. 'float16') or '*'"
        elif not _is_implementation_sequence(entries):
            problem = (
                "entries must be a non-empty tuple of "
                f"{', '.join(map(repr, IMPLEMENTATIONS))}"
            )
        if problem:
            raise ValueError(
                f"Received an invalid auto row for kernel {kernel!r}: {problem}. "
                f"Received: {key!r}: {entries!r}"
            )
        row[key] = tuple(entries)
    return row


def _is_floating_dtype_name(name: str) -> bool:
    # Canonical names only: the table is looked up by ``dtype.name`` ("half" never matches).
    try:
        dtype = tf.as_dtype(name)
    except TypeError:
        return False
    return dtype.is_floating and dtype.name == name


def _is_implementation_sequence(entries) -> bool:
    if isinstance(entries, str) or not isinstance(entries, Sequence):
        return False
    return bool(entries) and all(e in IMPLEMENTATIONS for e in entries)


# Keywords the dispatcher passes beside a kernel's own options.
RESERVED_OPTIONS = ("implementation", "platform", "dtype", "work")


def check_option_names(fn: Callable, what: str) -> None:
    """Raises TypeError if ``fn`` takes an argument the dispatcher reserves."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C function: nothing to check
        return
    clashes = [name for name in parameters if name in RESERVED_OPTIONS]
    if clashes:
        raise TypeError(
            f"{what} cannot take arguments named {', '.join(map(repr, RESERVED_OPTIONS))}: "
            f"dispatch passes those itself. Received arguments named: {', '.join(clashes)}"
        )


def floating_input(x, implementation, name="x"):
    """A public kernel's first checks: ``implementation`` is valid and ``x`` converts
    to a floating tensor, which it returns; ValueError or TypeError otherwise."""
    check_implementation(implementation)
    x = tf.convert_to_tensor(x)
    check_floating(name, x)
    return x


def onednn_enabled() -> bool:
    """Whether TensorFlow's oneDNN CPU kernels are on in this process."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # the private module moved: fall back on TF's documented switch
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "0").lower() in ("1", "true")
    return bool(_pywrap_util_port.IsMklEnabled())


def cpu_has_native_bfloat16() -> bool:
    """Whether the CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return False
    return False


@functools.lru_cache(maxsize=None)
def cpu_platform() -> str:
    """The auto-table platform name of this process's CPU (fixed once TF is loaded)."""
    if not onednn_enabled():
        return "cpu"
    return "cpu-onednn-bf16" if cpu_has_native_bfloat16() else "cpu-onednn"


def platform_of(x) -> str:
    """The platform a tensor's computation runs on: a ``PLATFORMS`` entry."""
    return _platform_of_device(getattr(x, "device", "") or "")


@functools.lru_cache(maxsize=64)
def _platform_of_device(device: str) -> str:
    if device:
        device_type = tf.DeviceSpec.from_string(device).device_type
    else:  # a symbolic tensor not yet placed: TF places it on a GPU when one is visible
        device_type = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    return "gpu" if device_type == "GPU" else cpu_platform()


def native_low_precision_matmul(platform: str, dtype: tf.DType) -> bool:
    """Whether a float16/bfloat16 matmul on ``platform`` already accumulates in float32.

    cuBLAS accumulates half-precision products in float32, and so does oneDNN's
    bfloat16 matmul where the CPU has bfloat16 instructions. Elsewhere the compiled
    paths cast operands to float32 themselves, which on these CPUs is also faster.
    """
    if platform == "gpu":
        return dtype in (tf.float16, tf.bfloat16)
    return platform == "cpu-onednn-bf16" and dtype == tf.bfloat16


class Kernel:
    """One kernel: its reference, its compiled algorithm, and its dispatch rules.

    Args:
        name: short name, used in errors, the auto table and profiler scopes
            (``fastlayers/<name>/<implementation>``).
        reference: the eager spec, ``reference(*tensors, **options)``.
        compiled: the algorithm run by ``"graph"`` and ``"xla"``, with the same
            signature; defaults to ``reference``.
        auto: the auto table's row: a mapping from ``(platform, dtype name)`` to an
            ordered tuple of implementations; ``(platform, "*")`` matches any dtype.
        not_supported_reasons: optional
            ``fn(implementation, platform=..., dtype=..., **options) -> list[str]``.
        upcast: run float16/bfloat16 calls in float32 and cast floating results
            back, which gives a function written without care for precision the
            float32 accumulation the precision contract asks for.
        native: optional native implementation with the reference's signature,
            run by ``"native"`` (its own reasons come from ``not_supported_reasons``).
    """

    def __init__(
        self,
        name: str,
        reference: Callable,
        compiled: Callable | None = None,
        *,
        auto: dict[tuple[str, str], Sequence[str]],
        not_supported_reasons: Callable[..., list[str]] | None = None,
        upcast: bool = False,
        native: Callable | None = None,
    ):
        self.name = name
        self.native = native
        self.reference = _upcasting(reference) if upcast else reference
        self.compiled = _upcasting(compiled or reference) if upcast else compiled or reference
        self.auto = check_auto_row(auto, name)
        self._reasons = not_supported_reasons
        # reduce_retracing: a second input shape traces a shape-generic graph instead
        # of one graph per batch size (XLA still compiles one program per shape), so
        # compiled code must not assume static sizes. Kernels write their control
        # flow with explicit TF ops, so autograph has nothing to convert.
        self._functions = {
            implementation: tf.function(
                _renamed(self.compiled, function_name(name, implementation)),
                jit_compile=True if implementation == "xla" else None,
                reduce_retracing=True,
                autograph=False,
            )
            for implementation in ("graph", "xla")
        }

    def candidates(self, platform: str, dtype: tf.DType) -> tuple[str, ...]:
        """The auto table's ordered preferences for this platform and dtype."""
        for key in ((platform, dtype.name), (platform, "*")):
            if key in self.auto:
                return tuple(self.auto[key])
        return tuple(i for i in IMPLEMENTATIONS[::-1] if i != "native" or self.native is not None)

    def not_supported_reasons(self, implementation, *, platform, dtype, **options) -> list[str]:
        """Why ``implementation`` cannot take this call; empty when it can."""
        if implementation == "native" and self.native is None:
            return [f"kernel {self.name!r} has no native implementation"]
        if self._reasons is None:
            return []
        return list(self._reasons(implementation, platform=platform, dtype=dtype, **options))

    def select(
        self, implementation, *, platform: str, dtype: tf.DType, work: float | None = None, **options
    ) -> str:
        """Resolves ``implementation`` (None = auto) for one call, or raises ValueError.

        ``work`` is the call's FLOP count when the kernel knows it: auto runs an eager
        call below ``auto.EAGER_REFERENCE_BELOW_FLOPS`` with the reference.
        """
        check_implementation(implementation)
        if (
            implementation is None
            and work is not None
            and work < EAGER_REFERENCE_BELOW_FLOPS
            and tf.executing_eagerly()
            and not self.not_supported_reasons("reference", platform=platform, dtype=dtype, **options)
        ):
            return "reference"
        if implementation is not None:
            reasons = self.not_supported_reasons(
                implementation, platform=platform, dtype=dtype, **options
            )
            if reasons:
                raise ValueError(
                    f"implementation={implementation!r} cannot run kernel {self.name!r} "
                    f"for dtype {dtype.name} on {platform}: " + "; ".join(reasons)
                )
            return implementation
        refused = []
        for candidate in self.candidates(platform, dtype):
            with _automatic_selection():
                reasons = self.not_supported_reasons(
                    candidate, platform=platform, dtype=dtype, **options
                )
            if not reasons:
                return candidate
            refused.append(f"{candidate!r}: " + "; ".join(reasons))
        raise ValueError(
            f"No implementation of kernel {self.name!r} supports dtype {dtype.name} on "
            f"{platform}. Refused: " + " | ".join(refused)
        )

    def run(self, implementation: str, *tensors, **options):
        """Runs a resolved implementation under the profiler scope ``fastlayers/<name>/<impl>``.

        Inside a graph the name scope prefixes the op names, which the trace viewer
        shows; eager ops carry no scoped names, so an eager call of any
        implementation is wrapped in a profiler ``Trace`` event of the same name.
        """
        scope = scope_name(self.name, implementation)
        with tf.name_scope(scope):
            if tf.executing_eagerly():
                with tf.profiler.experimental.Trace(scope):
                    return self._call(implementation, *tensors, **options)
            return self._call(implementation, *tensors, **options)

    def _call(self, implementation: str, *tensors, **options):
        if implementation == "reference":
            return self.reference(*tensors, **options)
        if implementation == "native":
            if self.native is None:
                raise ValueError(f"Kernel {self.name!r} has no native implementation to run.")
            return self.native(*tensors, **options)
        if implementation == "graph" and not tf.executing_eagerly():
            # Already inside a graph: inline the ops so grappler fuses them with
            # their neighbours; a nested function call would only be inlined later.
            return self.compiled(*tensors, **options)
        return self._functions[implementation](*tensors, **options)

    def __call__(self, *tensors, implementation=None, **options):
        """Runs the kernel: the implementation is selected for the first floating tensor."""
        return self.apply(tensors, options, implementation=implementation)

    def apply(self, tensors, options, *, implementation=None, dtype=None):
        """Runs the kernel on ``tensors`` (a tuple) with ``options`` (a dict).

        The implementation is selected for ``dtype``, by default the dtype of the
        first floating tensor; a layer passes its compute dtype, which also serves
        a call whose inputs are all integers (an embedding lookup, say).
        """
        check_implementation(implementation)
        if all(isinstance(t, tf.Tensor) for t in tensors):  # the common case, kept cheap
            flat = tensors = tuple(tensors)
        else:
            tensors = tf.nest.map_structure(_as_tensor, tuple(tensors))
            flat = [t for t in tf.nest.flatten(tensors) if isinstance(t, tf.Tensor)]
        floating = [t for t in flat if t.dtype.is_floating]
        if dtype is None:
            if not floating:
                received = ", ".join(
                    t.dtype.name if isinstance(t, tf.Tensor) else type(t).__name__
                    for t in tf.nest.flatten(tensors)
                )
                raise TypeError(
                    f"Kernel {self.name!r} needs at least one floating tensor argument. "
                    f"Received arguments of types: {received}"
                )
            dtype = floating[0].dtype
        leader = floating[0] if floating else flat[0] if flat else None
        platform = platform_of(leader)
        chosen = self.select(
            implementation, platform=platform, dtype=tf.as_dtype(dtype), **options
        )
        return self.run(chosen, *tensors, **options)


def _as_tensor(value):
    if isinstance(value, (tf.Tensor, tf.Variable)) or hasattr(value, "__array__"):
        return tf.convert_to_tensor(value)
    return value


def cast_floating(structure, dtype):
    """``structure`` with every floating tensor cast to ``dtype``; the rest unchanged."""
    return tf.nest.map_structure(
        lambda t: tf.cast(t, dtype) if isinstance(t, tf.Tensor) and t.dtype.is_floating else t,
        structure,
    )


def _upcasting(fn: Callable) -> Callable:
    """``fn`` run in float32 when its first floating argument is float16/bfloat16."""

    @functools.wraps(fn)
    def upcast(*tensors, **options):
        floating = [
            t for t in tf.nest.flatten(tensors) if isinstance(t, tf.Tensor) and t.dtype.is_floating
        ]
        dtype = floating[0].dtype if floating else None
        if dtype not in (tf.float16, tf.bfloat16):
            return fn(*tensors, **options)
        return cast_floating(fn(*cast_floating(tensors, tf.float32), **options), dtype)

    return upcast


def kernel(
    name: str | Callable | None = None,
    *,
    compiled: Callable | None = None,
    auto: dict[tuple[str, str], Sequence[str]] | None = None,
    not_supported_reasons: Callable[..., list[str]] | None = None,
    upcast: bool = False,
):
    """Declares a kernel from its reference function; the result dispatches like ours.

    Example:

    ```python
    @fastlayers.kernels.kernel(upcast=True)
    def scaled_tanh(x, scale=1.0):
        return scale * tf.tanh(x)

    y = scaled_tanh(x, scale=2.0, implementation="xla")
    ```

    ``@fastlayers.kernels.kernel`` without arguments declares one with the defaults.

    Args:
        name: the kernel's name in errors and profiler scopes (default: the
            function's name).
        compiled: a hand-written faster algorithm with the reference's signature,
            run by ``"graph"`` and ``"xla"``; by default they compile the reference.
        auto: the auto row, ``{(platform, dtype name or "*"): (implementation, ...)}``;
            by default ``fastlayers.kernels.auto.DEFAULT``.
        not_supported_reasons: ``fn(implementation, platform=, dtype=, **options)``
            returning why an implementation cannot take a call.
        upcast: run float16/bfloat16 calls in float32 (see ``Kernel``).
    """
    if callable(name):  # used bare, as @kernel
        return kernel()(name)

    def declare(reference: Callable) -> Kernel:
        check_option_names(reference, f"Kernel {name or reference.__name__!r}'s reference")
        declared = Kernel(
            name or reference.__name__,
            reference,
            compiled,
            auto=auto or DEFAULT,
            not_supported_reasons=not_supported_reasons,
            upcast=upcast,
        )
        functools.update_wrapper(declared, reference, updated=())
        return declared

    return declare
