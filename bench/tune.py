"""``fastlayers tune``: measure auto's candidates on this machine and keep the winners.

Each case (a suite's fastlayers step at a size and dtype policy, a ``--layer``, or a
``--model FILE.keras``) runs once while ``fastlayers.kernels.dispatch.recording``
collects the auto kernel calls it makes; each call's signature is then tuned
(``fastlayers.kernels.tuning.tune``) and its winner written to this machine's
cache, which every later process reads. A case run under a gradient tape
(``attention-backward``, ``--modes`` with a training step) is tuned forward and
backward. The table gives each choice with its speed-up over the table's choice
and, for suites, over Keras's step timed the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

from fastlayers.bench.errors import CommandError

HELP = "measure auto's candidates on this machine and cache the fastest"
DESCRIPTION = (
    "Times every implementation and variant (tile sizes, softmax formulation) of the "
    "kernel calls a suite, a layer or a saved model makes, interleaved, medians within a "
    "time budget, and writes each winner to this machine's cache ($FASTLAYERS_CACHE_DIR, "
    "default ~/.cache/fastlayers), which auto reads from then on."
)
TUNED_SUITES = ("dense", "matmul", "attention", "attention-backward")


class UsageError(CommandError):
    """A bad option, or a cache that cannot be written."""


def _csv(kind, choices):
    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if not items or unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {(unknown or [text])[0]!r} (choose from {', '.join(choices)})")
        return items

    return parse


def _sizes(text):
    if text in ("quick", "sweep"):
        return text
    try:
        sizes = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) <= 0:
        raise argparse.ArgumentTypeError(
            f"invalid sizes {text!r} (expected positive integers, `quick` or `sweep`)")
    return sizes


def _parsed(parse):
    def convert(text):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


@dataclasses.dataclass
class Tuned:
    """One tuned signature, as the table and ``--json`` show it."""

    case: str
    kernel: str
    dtype: str
    mode: str
    choice: str
    table_choice: str
    over_table: float | None
    over_keras: float | None
    record: dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``fastlayers tune``'s options: those of ``fastlayers bench`` that name cases, and
    ``--model``."""
    from fastlayers.bench.cases import HEADLINE_POLICIES, MODES, POLICIES
    from fastlayers.bench.layer_spec import builtin_names, parse_input_shape, parse_layer_args
    from fastlayers.kernels import tuning

    parser.add_argument("--suite", type=_csv("suite", TUNED_SUITES),
                        help=f"comma-separated suites, of {', '.join(TUNED_SUITES)} "
                        "(default: dense, or none with --layer or --model)")
    parser.add_argument("--layer", metavar="LAYER",
                        help=f"a fastlayers layer ({', '.join(builtin_names())}) or your own "
                        "as module:Class, as for fastlayers bench")
    parser.add_argument("--model", metavar="FILE.keras",
                        help="a saved Keras model: every auto kernel call it makes on "
                        "--input-shape is tuned")
    parser.add_argument("--input-shape", type=_parsed(parse_input_shape), metavar="SHAPE",
                        help="with --layer or --model: the input's shape, batch first, e.g. "
                        "64,128 ('8,64;8,32' for several inputs)")
    parser.add_argument("--layer-args", type=_parsed(parse_layer_args), metavar="JSON",
                        help="with --layer: constructor arguments as a JSON object")
    parser.add_argument("--sizes", type=_sizes, default="quick",
                        help="comma-separated sizes of each suite's x axis, `quick` or "
                        "`sweep` (default: each suite's quick sizes)")
    parser.add_argument("--dtypes", type=_csv("dtype policy", POLICIES),
                        default=list(HEADLINE_POLICIES),
                        help=f"comma-separated Keras dtype policies (default: "
                        f"{','.join(HEADLINE_POLICIES)}; any of {', '.join(POLICIES)})")
    parser.add_argument("--modes", type=_csv("mode", MODES), default=["function"],
                        help="how candidates are timed: function (inside a tf.function, "
                        "as a compiled model calls them) or eager; with both, function "
                        "(one choice serves a signature) (default: function)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="seconds to tune one signature, compiles included (default: "
                        f"${tuning.BUDGET_ENV} or {tuning.DEFAULT_BUDGET_SECONDS:g})")
    parser.add_argument("--json", metavar="PATH", help="write the choices and their timings")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_cache_writable() -> str:
    from fastlayers.kernels import tuning

    directory = tuning.cache_dir()
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise UsageError(
            f"cannot write the tuning cache in {directory} ({error.strerror or error}); "
            f"set {tuning.CACHE_DIR_ENV} to a writable directory"
        ) from None
    return directory


@dataclasses.dataclass
class _Case:
    name: str
    policy: str
    step: object  # zero-argument eager callable making the case's kernel calls
    backward: bool
    keras_step: object = None


def _suite_cases(names, sizes, policies) -> list[_Case]:
    from fastlayers.bench import cases as cases_lib

    found = []
    for name in names:
        suite = cases_lib.SUITES[name]
        chosen = sizes
        if isinstance(sizes, str):
            chosen = suite.sweep_sizes if sizes == "sweep" else suite.quick_sizes
        for size in chosen:
            shape = suite.shape(size)
            for policy in policies:
                keras_provider = suite.baselines[0] if suite.baselines else None
                found.append(_Case(
                    f"{name} {suite.label(shape)}",
                    policy,
                    suite.provider("fastlayers").build(shape, policy),
                    backward=name.endswith("-backward"),
                    keras_step=(lambda p=keras_provider, s=shape, pol=policy: p.build(s, pol))
                    if keras_provider else None,
                ))
    return found


def _layer_cases(args, policies) -> list[_Case]:
    from fastlayers.bench.layer_spec import LayerError, format_shapes, random_inputs, resolve_layer

    if ":" in args.layer and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # a user's module:Class, as fastlayers bench finds it
    spec = resolve_layer(args.layer, input_shape=args.input_shape, layer_args=args.layer_args)
    found = []
    for policy in policies:
        try:
            layer = spec.make(policy)
            spec.build(layer, spec.input_shapes, policy)
        except Exception as error:  # noqa: BLE001 - a user's layer: any error is one line
            raise LayerError(f"cannot build {spec.name}: {error}") from None
        inputs = random_inputs(spec.input_shapes, policy)
        found.append(_Case(f"{spec.name} {format_shapes(spec.input_shapes)}", policy,
                           lambda layer=layer, inputs=inputs: spec.call(layer, inputs), False))
    return found


def _model_cases(args, policies) -> list[_Case]:
    import keras
    from fastlayers.bench.layer_spec import format_shapes, random_inputs

    if not args.input_shape:
        raise UsageError("argument --model: needs --input-shape")
    if not os.path.isfile(args.model):
        raise UsageError(f"argument --model: no such file {args.model!r}")
    try:
        import fastlayers.layers  # noqa: F401 - registers the layers a model may hold

        model = keras.saving.load_model(args.model)
    except Exception as error:  # noqa: BLE001 - any unreadable model is one line
        raise UsageError(f"argument --model: cannot load {args.model}: {error}") from None
    policy = model.dtype_policy.name if hasattr(model, "dtype_policy") else policies[0]
    inputs = random_inputs(args.input_shape, policy)
    return [_Case(f"{os.path.basename(args.model)} {format_shapes(args.input_shape)}", policy,
                  lambda: model(inputs), False)]


def _recorded_calls(case: _Case):
    from fastlayers.kernels import dispatch

    with dispatch.recording() as calls:
        case.step()
    return calls


# A Keras call at least this long is timed once: a ratio to it moves by less than the
# noise of a second call, and a slow baseline (bfloat16 attention on a CPU without
# bfloat16 instructions runs for tens of seconds) must not dominate the tuning time.
KERAS_ONE_CALL_SECONDS = 2.0


def _time_keras(case: _Case, in_function: bool) -> float | None:
    """Seconds of one call of the case's Keras step, timed as the tuner times: traced
    first (not timed), then the median of three calls, or one call if it is long."""
    import tensorflow as tf

    if case.keras_step is None:
        return None
    step = case.keras_step()
    if in_function:
        step = tf.function(step)
        step.get_concrete_function()  # trace only
    times = []
    while len(times) < 3:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if times[0] >= KERAS_ONE_CALL_SECONDS:
            break
    return statistics.median(times)


def _progress(done: int, total: int, what: str, quiet: bool) -> None:
    if quiet:
        return
    width = 24
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what[:50]:<50}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _unique_calls(cases):
    from fastlayers.kernels import tuning

    seen, found = set(), []
    for case in cases:
        for call in _recorded_calls(case):
            key = tuning.make_key(call.kernel, call.tensors, call.options,
                                  platform=call.selection.platform, dtype=call.dtype)
            key = dataclasses.replace(key, flags=json.dumps(
                {**json.loads(key.flags), "mode": "forward+backward" if call.backward else "forward"},
                sort_keys=True))
            if key not in seen:
                seen.add(key)
                found.append((case, call, key))
    return found


def run(args) -> int:
    from fastlayers.kernels import tuning

    sources = [bool(args.suite), bool(args.layer), bool(args.model)]
    if args.layer and args.model:
        raise UsageError("argument --model: not allowed with --layer")
    for option, value in (("--input-shape", args.input_shape), ("--layer-args", args.layer_args)):
        if value is not None and not (args.layer or (args.model and option == "--input-shape")):
            raise UsageError(f"argument {option}: needs --layer" + (" or --model" if option == "--input-shape" else ""))
    if args.budget is not None and not args.budget > 0:
        raise UsageError(f"argument --budget: expected a positive number of seconds, got {args.budget:g}")
    if args.json:
        from fastlayers.bench import files

        files.check_writable(args.json, "--json")
    directory = _check_cache_writable()
    names = args.suite if args.suite else ([] if any(sources[1:]) else ["dense"])
    cases = _suite_cases(names, args.sizes, args.dtypes)
    if args.layer:
        cases += _layer_cases(args, args.dtypes)
    if args.model:
        cases += _model_cases(args, args.dtypes)
    in_function = "function" in args.modes
    print(f"fastlayers tune: cache {tuning.cache().path}", file=sys.stderr)
    calls = _unique_calls(cases)
    results = []
    keras_seconds = {}
    for index, (case, call, key) in enumerate(calls):
        _progress(index, len(calls), f"{case.name} {case.policy}", args.quiet)
        record = tuning.tune(
            call.kernel, call.tensors, call.options, platform=call.selection.platform,
            dtype=call.dtype, backward=call.backward, in_function=in_function,
            budget=args.budget, key=key,
        )
        if record is None:
            continue
        seconds = record["seconds"]
        best = seconds[record["label"]]
        table = seconds.get(record["table_choice"])
        if id(case) not in keras_seconds:
            keras_seconds[id(case)] = _time_keras(case, in_function)
        keras = keras_seconds[id(case)]
        results.append(Tuned(
            case=case.name, kernel=call.kernel.name, dtype=call.dtype.name,
            mode="forward+backward" if call.backward else "forward",
            choice=record["label"], table_choice=record["table_choice"],
            over_table=None if table is None else table / best,
            over_keras=None if keras is None else keras / best,
            record=record,
        ))
    _progress(len(calls), len(calls), "done", args.quiet)
    print(table_text(results))
    if args.json:
        from fastlayers.bench import files

        files.write_json(args.json, {"cache": directory, "choices": [dataclasses.asdict(r) for r in results]})
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def table_text(results) -> str:
    """One row per tuned signature: the choice and its speed-ups."""
    header = ("case", "kernel", "dtype", "mode", "choice", "table's choice", "vs table", "vs keras")
    rows = [header]
    for r in results:
        rows.append((
            r.case, r.kernel, r.dtype, r.mode, r.choice, r.table_choice,
            "-" if r.over_table is None else f"{r.over_table:.2f}x",
            "-" if r.over_keras is None else f"{r.over_keras:.2f}x",
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
