"""Implementation dispatch shared by every fastlayers kernel.

A kernel has one eager **reference** implementation (plain TF ops, the spec), one
compiled algorithm that runs two ways, ``"graph"`` (``tf.function``; grappler and
oneDNN fusions on CPU) and ``"xla"`` (``tf.function(jit_compile=True)``), and
optionally a ``"native"`` one (a C++ op). A compiled algorithm may come in
**variants** (tile sizes, a softmax formulation, a layout): a frozen, hashable,
JSON-serialisable dataclass per kernel.

``Kernel.select`` makes one ``Selection`` per call: the implementation, its variant,
and where the choice came from: ``"explicit"`` (the caller named it), ``"tuned"``
(this machine's tuning cache, ``fastlayers.kernels.tuning``), ``"table"`` (the
shipped auto table, ``fastlayers.kernels.auto``, the first entry of the row that
supports the call) or ``"small eager call"`` (the reference, below the kernel's
``eager_reference_below``, by default ``auto.EAGER_REFERENCE_BELOW_FLOPS``). The compiled function receives it as the
keyword ``selection`` if it declares one.

An implementation that cannot take a call says why, as a list of readable reasons.
An explicit request that cannot run raises a ValueError naming those reasons; only
auto moves on to the next entry of its row, and never past the end of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import numbers
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import tensorflow as tf
from fastlayers.kernels import platform as platform_lib
from fastlayers.kernels import tuning
from fastlayers.kernels.auto import DEFAULT, EAGER_REFERENCE_BELOW_FLOPS
from fastlayers.kernels.platform import (  # noqa: F401 (dispatch's public names)
    PLATFORMS,
    cpu_has_native_bfloat16,
    cpu_platform,
    native_low_precision_matmul,
    onednn_enabled,
    platform_of,
)
from fastlayers.kernels.validation import check_floating

# The implementations every kernel has; a kernel may also have a native one.
IMPLEMENTATIONS = ("reference", "graph", "xla")
NATIVE = "native"
ALL_IMPLEMENTATIONS = IMPLEMENTATIONS + (NATIVE,)


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
    if implementation is None or implementation in ALL_IMPLEMENTATIONS:
        return implementation
    choices = ", ".join(["None"] + [repr(name) for name in ALL_IMPLEMENTATIONS])
    raise ValueError(
        "Received an invalid value for `implementation`, expected one of "
        f"{choices}. Received: implementation={implementation!r}"
    )


def check_auto_row(auto, kernel: str = "kernel") -> dict[tuple, tuple[str, ...]]:
    """Returns an auto row as a dict of tuples if every key and entry is valid; else raises.

    A row maps ``(platform, dtype name or "*")`` to a non-empty ordered sequence of
    implementations; platforms are ``PLATFORMS``. A kernel whose variants name an
    ``auto_row`` (pooling's layouts) keys its rows ``(platform, dtype, auto_row)``.
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
        if not (isinstance(key, tuple) and len(key) in (2, 3) and all(isinstance(k, str) for k in key)):
            problem = "a key is not a (platform, dtype name) or (platform, dtype name, row) tuple of strings"
        elif key[0] not in PLATFORMS:
            problem = f"platform {key[0]!r} is not one of {', '.join(map(repr, PLATFORMS))}"
        elif key[1] != "*" and not _is_floating_dtype_name(key[1]):
            problem = f"dtype {key[1]!r} is not the name of a floating dtype (e.g. 'float16') or '*'"
        elif not _is_implementation_sequence(entries):
            problem = (
                "entries must be a non-empty tuple of "
                f"{', '.join(map(repr, ALL_IMPLEMENTATIONS))}"
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
    return bool(entries) and all(e in ALL_IMPLEMENTATIONS for e in entries)


# Keywords the dispatcher passes beside a kernel's own options.
RESERVED_OPTIONS = ("implementation", "platform", "dtype", "work", "tensors")
# Keywords the dispatcher fills in for a function that declares them: the call's
# ``Selection``, and the static layout of its tensors where the kernel computes one.
INJECTED = ("selection", "layout")


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


class _SelectionType(tf.types.experimental.TraceType):
    """How ``tf.function`` keys a trace on a ``Selection``: by value (its source
    aside), and the traced function receives the ``Selection`` itself."""

    def __init__(self, selection):
        self._selection = selection

    def is_subtype_of(self, other):
        return self == other

    def most_specific_common_supertype(self, others):
        return self if all(self == other for other in others) else None

    def placeholder_value(self, placeholder_context=None):
        return self._selection

    def to_tensors(self, value):
        return []

    def cast(self, value, casting_context):
        return value

    def __eq__(self, other):
        return isinstance(other, _SelectionType) and self._selection == other._selection

    def __hash__(self):
        return hash(self._selection)


@dataclasses.dataclass(frozen=True)
class Selection:
    """What dispatch chose for one call, passed to the function that runs it.

    Attributes:
        implementation: ``"reference"``, ``"graph"``, ``"xla"`` or ``"native"``.
        variant: the kernel's variant of that implementation (a frozen, hashable,
            JSON-serialisable dataclass), or None for a kernel without variants.
        source: where the choice came from: ``"explicit"``, ``"tuned"``,
            ``"table"`` or ``"small eager call"``. Not part of equality: the same
            choice from another source runs the same traced function.
        platform: the ``PLATFORMS`` entry the call runs on.
        dtype: the name of the dtype the choice was made for.
    """

    implementation: str
    variant: Any = None
    source: str = dataclasses.field(default="explicit", compare=False)
    platform: str = "cpu"
    dtype: str = "float32"

    @property
    def label(self) -> str:
        """The implementation and its variant, as bench and the tuner print them:
        ``"graph 256x2048"``, ``"xla"``."""
        return candidate_label(self.implementation, self.variant)

    def describe(self) -> str:
        """``"graph 256x2048, tuned"``: the label and where it came from."""
        return f"{self.label}, {self.source}"

    def __tf_tracing_type__(self, context):
        return _SelectionType(self)


def candidate_label(implementation: str, variant) -> str:
    """``implementation`` and the variant's ``label`` (its ``str`` by default)."""
    if variant is None:
        return implementation
    text = getattr(variant, "label", None) or str(variant)
    return f"{implementation} {text}" if text else implementation


def _declares(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _simple(value) -> Hashable:
    """An option value as a hashable, JSON-friendly key: what changes the algorithm
    is its type and plain value, never a tensor's contents."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_simple(v) for v in value)
    if isinstance(value, (tf.Tensor, tf.Variable)) or hasattr(value, "__array__"):
        return "tensor"
    if dataclasses.is_dataclass(value):
        return repr(value)
    return getattr(value, "__name__", type(value).__name__)


def size_bucket(size) -> int:
    """A dimension rounded up to a power of two (0 when unknown): nearby sizes share
    a tuning record."""
    if size is None:
        return 0
    return 1 << max(int(size) - 1, 0).bit_length() if size > 1 else int(size)


def default_signature(*tensors, **options) -> tuple[tuple[int, ...], dict]:
    """A call's tuning key when the kernel states none: every tensor's dims rounded
    up to powers of two as the bucket; which tensors are absent, their ranks, and
    every plain option value as flags."""
    bucket, ranks = [], []
    for t in tf.nest.flatten(tensors):
        if isinstance(t, (tf.Tensor, tf.Variable)):
            dims = list(t.shape) if t.shape.rank is not None else []
            ranks.append(len(dims))
            bucket.extend(size_bucket(d) for d in dims)
        else:
            ranks.append(None if t is None else -1)
    flags = {"ranks": tuple(ranks)}
    flags.update({name: _simple(value) for name, value in sorted(options.items())})
    return tuple(bucket), flags


_MISSING = object()
# Signatures whose tuned lookup a kernel remembers before starting afresh.
_MEMO_SIZE = 1024


class Kernel:
    """One kernel: its reference, its compiled algorithm, and its dispatch rules.

    Args:
        name: short name, used in errors, the auto table, the tuning cache and
            profiler scopes (``fastlayers/<name>/<implementation>``).
        reference: the eager spec, ``reference(*tensors, **options)``.
        compiled: the algorithm run by ``"graph"`` and ``"xla"``, with the same
            signature; defaults to ``reference``. It may declare the keywords
            ``selection`` (the call's ``Selection``, variant included) and
            ``layout`` (what ``layout`` below returns).
        auto: the auto table's row: a mapping from ``(platform, dtype name)`` to an
            ordered tuple of implementations; ``(platform, "*")`` matches any dtype.
            Keys ``(platform, dtype, row)`` apply to calls for which ``auto_row``
            returns ``row``.
        not_supported_reasons: optional
            ``fn(implementation, platform=..., dtype=..., **options) -> list[str]``.
        upcast: run float16/bfloat16 calls in float32 and cast floating results
            back, which gives a function written without care for precision the
            float32 accumulation the precision contract asks for.
        native: the ``"native"`` implementation, ``native(*tensors, **options)``
            (declaring ``selection`` as ``compiled`` may), or None. If it has a
            ``not_built_reason()`` method returning a string, that string is why it
            cannot run now (its op failed to build, say); it is asked last, when
            nothing else refuses the call, since finding out may build the op. If its
            attribute ``auto_while_training`` is False, the auto table passes it over
            while a gradient tape records (a native forward whose gradient is slower
            than the compiled paths'); an explicit request, or a tuned choice timed
            forward and backward, still runs it.
        variants: optional ``fn(implementation, *, platform, dtype, shapes, **options)``
            returning that implementation's variants for the call (native's too), the
            default first; ``shapes`` holds each tensor argument's static shape (a
            tuple, or None for an argument that is not a tensor). The tuner times
            them all.
        work: optional ``fn(*tensors, **options)`` returning the call's FLOPs (None
            when unknown): auto runs eager calls below ``eager_reference_below``
            with the reference.
        eager_reference_below: the work (in ``work``'s units) below which auto
            runs an eager call with the reference, where a compiled call's fixed
            cost outweighs its speed; ``auto.EAGER_REFERENCE_BELOW_FLOPS`` when
            None, measured for matmuls. A kernel whose compiled or native path
            wins at smaller sizes states its own (0: never the reference).
        signature: optional ``fn(*tensors, **options)`` returning the tuning key's
            ``(bucket, flags)``: a tuple of ints (nearby calls are matched by it) and
            a dict of what changes the algorithm; ``default_signature`` otherwise.
        layout: optional ``fn(selection, *tensors, **options)`` returning a hashable
            static fact about the tensors that the compiled function needs kept
            through ``tf.function``'s shape relaxation, passed as ``layout``.
        choice_options: names of options that steer the selection (``variants``,
            ``not_supported_reasons``) and are not passed to the functions.
        auto_row: optional ``fn(**options)`` naming the row of ``auto`` a call
            takes (keys ``(platform, dtype, row)``), or None for the plain keys.
        default_variant: optional ``fn`` with the signature of ``variants``
            returning only the default, where listing every variant costs more
            than an eager call should spend.
    """

    def __init__(
        self,
        name: str,
        reference: Callable,
        compiled: Callable | None = None,
        *,
        auto: dict[tuple, Sequence[str]],
        not_supported_reasons: Callable[..., list[str]] | None = None,
        upcast: bool = False,
        native: Callable | None = None,
        variants: Callable[..., Sequence] | None = None,
        work: Callable[..., float | None] | None = None,
        eager_reference_below: float | None = None,
        signature: Callable[..., tuple[tuple[int, ...], dict]] | None = None,
        layout: Callable[..., Hashable] | None = None,
        choice_options: Sequence[str] = (),
        auto_row: Callable[..., str | None] | None = None,
        default_variant: Callable | None = None,
    ):
        self.name = name
        self.reference = _upcasting(reference) if upcast else reference
        self.compiled = _upcasting(compiled or reference) if upcast else compiled or reference
        self.native = native
        self.auto = check_auto_row(auto, name)
        self._reasons = not_supported_reasons
        self._variants = variants
        self._default_variant = default_variant
        self._work = work
        if eager_reference_below is None:
            eager_reference_below = EAGER_REFERENCE_BELOW_FLOPS
        elif isinstance(eager_reference_below, bool) or not (
            isinstance(eager_reference_below, numbers.Real) and eager_reference_below >= 0
        ):
            raise ValueError(
                "Received an invalid value for `eager_reference_below`, expected a "
                f"non-negative number or None. Received: eager_reference_below={eager_reference_below!r}"
            )
        self.eager_reference_below = float(eager_reference_below)
        self._signature = signature or default_signature
        self._layout = layout
        self._auto_row = auto_row
        self.choice_options = tuple(choice_options)
        self._tuned_memo: dict = {}
        self._injected = {
            implementation: tuple(
                keyword for keyword in INJECTED if fn is not None and _declares(fn, keyword)
            )
            for implementation, fn in (
                ("reference", self.reference),
                ("graph", self.compiled),
                ("xla", self.compiled),
                (NATIVE, native),
            )
        }
        # reduce_retracing: a second input shape traces a shape-generic graph instead
        # of one graph per batch size (XLA still compiles one program per shape), so
        # compiled code must not assume static sizes. Kernels write their control
        # flow with explicit TF ops, so autograph has nothing to convert.
        def compiled_function(implementation):
            return tf.function(
                _renamed(self.compiled, function_name(name, implementation)),
                jit_compile=True if implementation == "xla" else None,
                reduce_retracing=True,
                autograph=False,
            )

        self._functions = {implementation: compiled_function(implementation) for implementation in ("graph", "xla")}
        # XLA, called from inside a graph: a function of its own. A gradient traced in a
        # graph gives the XLA function a forward that returns its loops' intermediates
        # (TensorLists) for the backward; an eager call under a tape would then reuse
        # that forward, and TensorLists cannot leave an XLA cluster eagerly.
        self._xla_in_graph = compiled_function("xla")

    # -- what can run -----------------------------------------------------------

    def candidates(self, platform: str, dtype: tf.DType, row: str | None = None) -> tuple[str, ...]:
        """The auto table's ordered preferences for this platform and dtype (and row)."""
        keys = ((platform, dtype.name), (platform, "*"))
        if row is not None:
            keys = ((platform, dtype.name, row), (platform, "*", row)) + keys
        for key in keys:
            if key in self.auto:
                return tuple(self.auto[key])
        return IMPLEMENTATIONS[::-1]

    def implementations(self) -> tuple[str, ...]:
        """Every implementation this kernel has."""
        return ALL_IMPLEMENTATIONS if self.native is not None else IMPLEMENTATIONS

    def not_supported_reasons(self, implementation, *, platform, dtype, **options) -> list[str]:
        """Why ``implementation`` cannot take this call; empty when it can."""
        if implementation == NATIVE and self.native is None:
            return [f"kernel {self.name!r} has no native implementation"]
        reasons = []
        if implementation == NATIVE and platform_lib.in_xla_context():
            reasons.append(
                "a native op cannot run inside an XLA cluster (jit_compile=True), "
                "where XLA compiles the call itself"
            )
        if self._reasons is not None:
            reasons += list(self._reasons(implementation, platform=platform, dtype=dtype, **options))
        if implementation == NATIVE and not reasons:
            not_built = getattr(self.native, "not_built_reason", None)
            reason = not_built() if callable(not_built) else None
            if reason:
                reasons.append(f"its native op is not available: {reason}")
        return reasons

    def table_reasons(self, implementation) -> list[str]:
        """Why the auto table passes over an implementation that could take the call:
        a native one that asks not to be chosen while a gradient tape records."""
        if (
            implementation == NATIVE
            and not getattr(self.native, "auto_while_training", True)
            and platform_lib.gradient_recording()
        ):
            return [
                "a gradient tape is recording and the native op's gradient is slower than "
                "the compiled paths': the table trains with those (an explicit request or "
                "a tuned choice runs it)"
            ]
        return []

    def variants(self, implementation, *, platform, dtype, shapes=(), **options) -> tuple:
        """The variants of ``implementation`` for a call, the default first; ``(None,)``
        for a kernel without variants."""
        if self._variants is None:
            return (None,)
        found = tuple(
            self._variants(implementation, platform=platform, dtype=dtype, shapes=shapes, **options)
        )
        return found or (None,)

    def work(self, *tensors, **options) -> float | None:
        """The call's FLOPs where the kernel states them; else None."""
        return None if self._work is None else self._work(*tensors, **options)

    def signature(self, *tensors, **options) -> tuple[tuple[int, ...], dict]:
        """The tuning key's ``(bucket, flags)`` of a call (see ``Kernel``)."""
        return self._signature(*tensors, **options)

    # -- choosing ---------------------------------------------------------------

    def default_variant(self, implementation, *, platform, dtype, shapes=(), **options):
        """The variant an implementation runs unless tuned: the first of ``variants``."""
        if self._default_variant is not None:
            return self._default_variant(
                implementation, platform=platform, dtype=dtype, shapes=shapes, **options
            )
        return self.variants(implementation, platform=platform, dtype=dtype, shapes=shapes, **options)[0]

    def _selection(self, implementation, source, platform, dtype, shapes, options):
        variant = self.default_variant(
            implementation, platform=platform, dtype=dtype, shapes=shapes, **options
        )
        return Selection(implementation, variant, source, platform, dtype.name)

    def select(
        self,
        implementation,
        *,
        platform: str,
        dtype: tf.DType,
        work: float | None = None,
        tensors: Sequence = (),
        **options,
    ) -> Selection:
        """Resolves ``implementation`` (None = auto) for one call, or raises ValueError.

        Auto takes, in order: the reference for an eager call of known ``work``
        below the kernel's ``eager_reference_below``; this machine's tuned choice for
        the call's signature (nearest measured bucket), if still supported; with
        ``FASTLAYERS_AUTOTUNE=1`` a choice tuned now for a new signature; else the
        first entry of the auto table's row that supports the call. ``tensors`` are
        the call's tensor arguments (their shapes key the tuner and the variants).
        """
        check_implementation(implementation)
        dtype = tf.as_dtype(dtype)
        shapes = tuple(_static_shape(t) for t in tensors)
        if implementation is not None:
            reasons = self.not_supported_reasons(
                implementation, platform=platform, dtype=dtype, **options
            )
            if reasons:
                raise ValueError(
                    f"implementation={implementation!r} cannot run kernel {self.name!r} "
                    f"for dtype {dtype.name} on {platform}: " + "; ".join(reasons)
                )
            return self._selection(implementation, "explicit", platform, dtype, shapes, options)
        if (
            work is not None
            and work < self.eager_reference_below
            and tf.executing_eagerly()
            and not self.not_supported_reasons("reference", platform=platform, dtype=dtype, **options)
        ):
            return self._selection("reference", "small eager call", platform, dtype, shapes, options)
        if tensors:
            found = self._tuned_selection(tensors, shapes, options, platform, dtype)
            if found is not None:
                return found
        return self.table_selection(platform=platform, dtype=dtype, shapes=shapes, **options)

    def _tuned_selection(self, tensors, shapes, options, platform, dtype):
        """The tuned choice of a call, or None; memoized per signature until the cache
        changes, so that an eager call pays one dict lookup for it."""
        memo_key = (
            tuning.generation(),
            dtype,
            platform,
            shapes,
            tuple((name, _simple(value)) for name, value in options.items()),
            platform_lib.gradient_recording(),
            self.native is not None and platform_lib.in_xla_context(),
        )
        found = self._tuned_memo.get(memo_key, _MISSING)
        if found is _MISSING:
            tuned = tuning.choice_for(self, tensors, options, platform=platform, dtype=dtype)
            found = None
            if tuned is not None:
                found = self._supported_tuned(tuned, platform, dtype, shapes, options)
            if len(self._tuned_memo) > _MEMO_SIZE:
                self._tuned_memo.clear()
            self._tuned_memo[memo_key] = found
        return found

    def _supported_tuned(self, tuned, platform, dtype, shapes, options):
        implementation, variant_data = tuned
        if implementation not in self.implementations() or self.not_supported_reasons(
            implementation, platform=platform, dtype=dtype, **options
        ):
            return None
        default = self.default_variant(
            implementation, platform=platform, dtype=dtype, shapes=shapes, **options
        )
        if variant_data is None:
            variant = default
        elif default is None:  # the kernel no longer has variants
            return None
        else:
            try:
                variant = dataclasses.replace(default, **variant_data)
            except (TypeError, ValueError):  # fields that no longer exist or fit
                return None
        return Selection(implementation, variant, "tuned", platform, dtype.name)

    def table_selection(self, *, platform, dtype, shapes=(), **options) -> Selection:
        """The auto table's choice: its row's first entry that supports the call."""
        dtype = tf.as_dtype(dtype)
        refused = []
        for candidate in self._row_candidates(platform, dtype, shapes, options):
            reasons = self.table_reasons(candidate) or self.not_supported_reasons(
                candidate, platform=platform, dtype=dtype, **options
            )
            if not reasons:
                return self._selection(candidate, "table", platform, dtype, shapes, options)
            refused.append(f"{candidate!r}: " + "; ".join(reasons))
        raise ValueError(
            f"No implementation of kernel {self.name!r} supports dtype {dtype.name} on "
            f"{platform}. Refused: " + " | ".join(refused)
        )

    def _row_candidates(self, platform, dtype, shapes, options):
        row = None if self._auto_row is None else self._auto_row(**options)
        return self.candidates(platform, dtype, row)

    def tuning_candidates(self, *, platform, dtype, shapes=(), **options) -> list[Selection]:
        """Every supported implementation × variant for a call, in the table's order
        (its row first, then the implementations it leaves out): each
        implementation's default variant first, then the other variants. What the
        tuner times, in this order, while its budget lasts."""
        dtype = tf.as_dtype(dtype)
        order = list(self._row_candidates(platform, dtype, shapes, options))
        order += [name for name in self.implementations() if name not in order]
        supported = [
            implementation for implementation in order
            if not self.not_supported_reasons(implementation, platform=platform, dtype=dtype, **options)
        ]
        variants = {
            implementation: self.variants(
                implementation, platform=platform, dtype=dtype, shapes=shapes, **options
            )
            for implementation in supported
        }
        found = [Selection(i, variants[i][0], "tuned", platform, dtype.name) for i in supported]
        for implementation in supported:
            found += [
                Selection(implementation, variant, "tuned", platform, dtype.name)
                for variant in variants[implementation][1:]
            ]
        return found

    # -- running ----------------------------------------------------------------

    def run(self, selection, *tensors, **options):
        """Runs a resolved ``Selection`` (or an implementation name, with its default
        variant) under the profiler scope ``fastlayers/<name>/<implementation>``.

        Inside a graph the name scope prefixes the op names, which the trace viewer
        shows; eager ops carry no scoped names, so an eager call of any
        implementation is wrapped in a profiler ``Trace`` event of the same name.
        """
        if isinstance(selection, str):
            leader = next((t for t in tensors if isinstance(t, tf.Tensor)), None)
            dtype = leader.dtype if leader is not None and leader.dtype.is_floating else tf.float32
            selection = self._selection(
                selection, "explicit", platform_of(leader), dtype,
                tuple(_static_shape(t) for t in tensors), options,
            )
        for name in self.choice_options:
            options.pop(name, None)
        scope = scope_name(self.name, selection.implementation)
        with tf.name_scope(scope):
            if tf.executing_eagerly():
                with tf.profiler.experimental.Trace(scope):
                    return self._call(selection, tensors, options)
            return self._call(selection, tensors, options)

    def _call(self, selection, tensors, options):
        implementation = selection.implementation
        injected = self._injected[implementation]
        if "layout" in injected and self._layout is not None:
            options["layout"] = self._layout(selection, *tensors, **options)
        if "selection" in injected:
            options["selection"] = selection
        if implementation == "reference":
            return self.reference(*tensors, **options)
        if implementation == NATIVE:
            if self.native is None:
                raise ValueError(f"Kernel {self.name!r} has no native implementation to run.")
            return self.native(*tensors, **options)
        if not tf.executing_eagerly():
            if implementation == "graph":
                # Already inside a graph: inline the ops so grappler fuses them with
                # their neighbours; a nested function call would only be inlined later.
                return self.compiled(*tensors, **options)
            return self._xla_in_graph(*tensors, **options)
        return self._functions[implementation](*tensors, **options)

    # Dispatch has no tensor-dependent Python control flow for autograph to convert;
    # converting it and its hooks when a kernel is called from an autograph'd
    # function (a Keras train step) would only cost tracing time.
    @tf.autograph.experimental.do_not_convert
    def __call__(self, *tensors, implementation=None, **options):
        """Runs the kernel: the implementation is selected for the first floating tensor."""
        return self.apply(tensors, options, implementation=implementation)

    @tf.autograph.experimental.do_not_convert
    def apply(self, tensors, options, *, implementation=None, dtype=None):
        """Runs the kernel on ``tensors`` (a tuple) with ``options`` (a dict).

        The implementation is selected for ``dtype``, by default the dtype of the
        first floating tensor; a layer passes its compute dtype, which also serves
        a call whose inputs are all integers (an embedding lookup, say).
        """
        check_implementation(implementation)
        clashes = [name for name in INJECTED if name in options]
        if clashes:
            raise TypeError(
                f"Kernel {self.name!r} fills in {', '.join(map(repr, INJECTED))} itself. "
                f"Received options named: {', '.join(clashes)}"
            )
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
        work = self.work(*tensors, **options) if implementation is None else None
        selection = self.select(
            implementation,
            platform=platform,
            dtype=tf.as_dtype(dtype),
            work=work,
            tensors=tensors,
            **options,
        )
        if _RECORDERS and implementation is None:
            for calls in _RECORDERS:
                calls.append(Call(
                    self, tensors, dict(options), tf.as_dtype(dtype), selection,
                    platform_lib.gradient_recording(),
                ))
        return self.run(selection, *tensors, **options)


@dataclasses.dataclass
class Call:
    """One auto call of a kernel, as ``recording`` keeps it: what ``tuning.tune`` needs."""

    kernel: Kernel
    tensors: tuple
    options: dict
    dtype: tf.DType
    selection: Selection
    backward: bool  # whether a gradient tape recorded it (a training step)


# The lists ``recording`` blocks append to; empty (the common case) costs one test.
_RECORDERS: list[list[Call]] = []


@contextlib.contextmanager
def recording():
    """Collects every auto kernel call made inside the block, in order: what
    ``fastlayers tune --layer/--model`` tunes. Yields the list of ``Call``s."""
    calls: list[Call] = []
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        _RECORDERS.remove(calls)


def _static_shape(t):
    if isinstance(t, (tf.Tensor, tf.Variable)):
        return None if t.shape.rank is None else tuple(t.shape)
    return None


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
    native: Callable | None = None,
    variants: Callable[..., Sequence] | None = None,
    work: Callable[..., float | None] | None = None,
):
    """Declares a kernel from its reference function; the result dispatches like ours,
    and ``fastlayers tune`` (or ``FASTLAYERS_AUTOTUNE=1``) tunes it like ours.

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
        native: a ``"native"`` implementation (see ``Kernel``).
        variants: the compiled algorithm's variants for the tuner (see ``Kernel``).
        work: the call's FLOPs, for auto's small eager calls (see ``Kernel``).
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
            native=native,
            variants=variants,
            work=work,
        )
        functools.update_wrapper(declared, reference, updated=())
        return declared

    return declare
