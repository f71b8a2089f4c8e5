"""The ``fastlayers`` command: ``fastlayers bench`` and ``fastlayers profile``.

``fastlayers bench`` with no arguments measures the headline cases on the CPU and
prints a table; ``fastlayers bench --layer LAYER --input-shape 64,128`` measures one
layer, a fastlayers one (``Dense``) or your own (``my_layers:MyDense``);
``fastlayers profile LAYER --logdir DIR`` writes a profiler trace for TensorBoard.
Both commands name layers one way (``fastlayers.bench.layer_spec``). Bad input is
reported as one line on stderr with exit status 2; ``--fail-on-regression`` exits
with status 1 when a case got slower.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

EXIT_REGRESSION = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, raised instead of printed with the usage."""

    def error(self, message):
        raise UsageError(message)


def _csv(kind, choices=None, convert=str, expected=""):
    """A comma-separated list of ``kind`` (singular), each converted and checked."""

    def parse(text):
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        values = []
        for item in items:
            try:
                value = convert(item)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"invalid {kind} {item!r}" + (f" (expected {expected})" if expected else "")
                ) from None
            if choices is not None and value not in choices:
                raise argparse.ArgumentTypeError(
                    f"unknown {kind} {item!r} (choose from {', '.join(choices)})"
                )
            values.append(value)
        return values

    return parse


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def _sizes(text):
    if text in ("quick", "sweep"):
        return text
    return _csv(
        "size", convert=_positive_int, expected="positive integers, `quick` or `sweep`"
    )(text)


def _positive_int_arg(text):
    try:
        return _positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None


def _percent(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative percentage, got {text!r}")
    return value


def _shapes(text):
    from fastlayers.bench.layer_spec import parse_input_shape

    try:
        return parse_input_shape(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _layer_args(text):
    from fastlayers.bench.layer_spec import parse_layer_args

    try:
        return parse_layer_args(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


LAYER_HELP = (
    "a fastlayers layer ({names}) with its row of fastlayers.bench.profile.LAYER_DEFAULTS, "
    "or your own Keras layer class as module:Class (the module is imported from the "
    "current directory or PYTHONPATH)"
)
INPUT_SHAPE_HELP = (
    "the input's shape, batch axis first, e.g. 64,128 (or 64x128); a layer with several "
    "inputs takes one shape each, separated by ';' and quoted, e.g. '8,64;8,32', and is "
    "called with them as one list, layer([a, b]) (default for a fastlayers layer: its "
    "LAYER_DEFAULTS row; required for module:Class)"
)
LAYER_ARGS_HELP = (
    "constructor arguments as a JSON object, e.g. '{{\"units\": 256}}' (for a fastlayers "
    "layer they update its LAYER_DEFAULTS row); not dtype or implementation, which {what}"
)


def build_parser() -> argparse.ArgumentParser:
    from fastlayers.bench.cases import (
        DEVICES,
        HEADLINE_POLICIES,
        LAYER_PROVIDERS,
        MODES,
        POLICIES,
        SUITES,
    )
    from fastlayers.bench.build_cli import add_command as add_build_command
    from fastlayers.bench.layer_spec import builtin_names

    names = ", ".join(builtin_names())

    parser = _Parser(prog="fastlayers", description="fastlayers benchmarks and profiles.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    bench = commands.add_parser(
        "bench",
        help="measure layer throughput against tf.matmul and the Keras built-ins",
        description="Measures throughput (GFLOP/s) of fastlayers against the Keras "
        "built-in and tf.matmul, interleaving providers across repeats and taking medians. "
        "With --layer it measures one layer, a fastlayers layer or your own, in each of its "
        "implementations against its reference implementation, counting FLOPs with "
        "TensorFlow's op counter on a traced call (time per call when it counts none).",
    )
    headline = [name for name, suite in SUITES.items() if suite.headline]
    bench.add_argument("--suite", type=_csv("suite", tuple(SUITES)),
                       help=f"comma-separated suites, of {', '.join(SUITES)} "
                       f"(default: {','.join(headline)}, or none with --layer)")
    bench.add_argument("--layer", metavar="LAYER", help=LAYER_HELP.format(names=names))
    bench.add_argument("--input-shape", type=_shapes, metavar="SHAPE",
                       help="with --layer: " + INPUT_SHAPE_HELP)
    bench.add_argument("--layer-args", type=_layer_args, metavar="JSON",
                       help="with --layer: " + LAYER_ARGS_HELP.format(
                           what="--dtypes and the providers set"))
    axes = "; ".join(f"{name}: {suite.x_label}" for name, suite in SUITES.items())
    bench.add_argument("--sizes", type=_sizes, default="quick",
                       help=f"comma-separated sizes, each suite's x axis ({axes}; --layer: "
                       "the batch), `quick` (default: each suite's quick sizes, the input "
                       "shape's batch for --layer) or `sweep` (for --plot)")
    bench.add_argument("--dtypes", type=_csv("dtype policy", POLICIES),
                       default=list(HEADLINE_POLICIES),
                       help=f"comma-separated Keras dtype policies (default: "
                       f"{','.join(HEADLINE_POLICIES)}; any of {', '.join(POLICIES)})")
    bench.add_argument("--modes", type=_csv("mode", MODES), default=list(MODES),
                       help="eager calls, tf.function calls, or both (default)")
    bench.add_argument("--device", choices=DEVICES, default="cpu",
                       help="where inputs, weights and calls live (default: cpu)")
    providers = "; ".join(f"{name}: {', '.join(s.provider_names)}" for name, s in SUITES.items())
    bench.add_argument("--providers", type=_csv("provider"),
                       help=f"comma-separated providers (default: all of the suite; {providers}; "
                       f"--layer: {', '.join(LAYER_PROVIDERS)} for a FastLayer or CompiledLayer, "
                       "with reference as the baseline, or `layer` for any other Keras layer)")
    bench.add_argument("--repeats", type=_positive_int_arg, default=5,
                       help="interleaved timed rounds per case; the median is reported")
    bench.add_argument("--json", metavar="PATH", help="write results and the machine as JSON")
    bench.add_argument("--plot", metavar="PATH.png", help="draw throughput against size")
    bench.add_argument("--compare", metavar="OLD.json", help="compare with a --json result")
    bench.add_argument("--fail-on-regression", metavar="PCT", type=_percent,
                       help="with --compare: exit 1 if a case is more than PCT%% slower")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")

    profile = commands.add_parser(
        "profile",
        help="capture a TensorBoard profiler trace of a layer",
        description="Runs a few warm steps of a layer, a fastlayers layer or your own, and "
        "captures a profiler trace that TensorBoard's Profile tab opens. Each kernel call "
        "is under the scope fastlayers/<kernel>/<implementation>; a CompiledLayer's kernel "
        "is its class name in snake_case (MyDense: fastlayers/my_dense/xla).",
    )
    profile.add_argument("layer", help=LAYER_HELP.format(names=names))
    profile.add_argument("--logdir", required=True, help="TensorBoard log directory")
    profile.add_argument("--input-shape", type=_shapes, metavar="SHAPE", help=INPUT_SHAPE_HELP)
    profile.add_argument("--layer-args", type=_layer_args, metavar="JSON",
                         help=LAYER_ARGS_HELP.format(what="--dtype and --implementation set"))
    profile.add_argument("--dtype", choices=POLICIES, default="float32",
                         help="Keras dtype policy")
    profile.add_argument("--implementation", choices=("auto", "reference", "graph", "xla"),
                         default="auto")
    profile.add_argument("--mode", choices=MODES, default="eager")
    profile.add_argument("--device", choices=DEVICES, default="cpu")
    profile.add_argument("--steps", type=_positive_int_arg, default=5,
                         help="profiled steps, after two warm-up steps")
    add_build_command(commands)
    return parser


def _bench(args) -> int:
    from fastlayers.bench import cases as cases_lib
    from fastlayers.bench import runner
    from fastlayers.bench.layer_spec import resolve_layer

    for option, value in (("--input-shape", args.input_shape), ("--layer-args", args.layer_args)):
        if value is not None and not args.layer:
            raise UsageError(f"argument {option}: needs --layer")
    if args.suite is not None:
        names = args.suite
    elif args.layer:
        names = []
    else:
        names = [name for name, suite in cases_lib.SUITES.items() if suite.headline]
    suites = [cases_lib.SUITES[name] for name in names]
    if args.layer:
        _import_from_cwd(args.layer)
        spec = resolve_layer(args.layer, input_shape=args.input_shape,
                             layer_args=args.layer_args)
        suites.append(cases_lib.layer_suite(spec))
    if args.providers:
        known = {name for suite in suites for name in suite.provider_names}
        for name in args.providers:
            if name not in known:
                raise UsageError(
                    f"argument --providers: unknown provider {name!r} for suite "
                    f"{','.join(s.name for s in suites)} (choose from "
                    f"{', '.join(sorted(known))})"
                )
    if args.device == "gpu" and not cases_lib.gpu_available():
        raise UsageError("argument --device: gpu requested but no GPU is visible to TensorFlow")
    if args.fail_on_regression is not None and not args.compare:
        raise UsageError("argument --fail-on-regression: needs --compare OLD.json")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            runner.check_writable(path, option)
    old = runner.load_results(args.compare) if args.compare else None

    all_cases = []
    for suite in suites:
        if args.sizes == "quick":
            sizes = suite.quick_sizes
        elif args.sizes == "sweep":
            sizes = suite.sweep_sizes
        else:
            sizes = args.sizes
        providers = [p for p in args.providers or suite.provider_names if p in suite.provider_names]
        if not providers:
            continue  # --providers names none of this suite's (they belong to another suite)
        all_cases += cases_lib.cases(suite, sizes, args.dtypes, args.modes, [args.device],
                                     providers)
    machine = runner.machine_info()
    print(f"fastlayers bench on {runner.machine_name(machine)}", file=sys.stderr)
    results = runner.run(all_cases, args.repeats, progress=not args.quiet)

    exit_code = 0
    if old is not None:
        matched = runner.attach_old(results, old)
        if matched == 0 and args.fail_on_regression is not None:
            raise UsageError(
                f"argument --compare: {args.compare} has no case in common with this run"
            )
    print(runner.table(results))
    if args.fail_on_regression is not None:
        slower = runner.regressions(results, args.fail_on_regression)
        if slower:
            names = ", ".join(
                f"{r.case.suite.name} {r.case.size} {r.case.policy} {r.case.mode} "
                f"{r.case.provider.name} ({100 * r.change:+.1f}%)" for r in slower)
            print(f"fastlayers bench: regression over {args.fail_on_regression:g}%: {names}",
                  file=sys.stderr)
            exit_code = EXIT_REGRESSION
    if args.json:
        settings = {
            "suites": [suite.name for suite in suites], "sizes": args.sizes,
            "dtypes": args.dtypes, "modes": args.modes, "device": args.device,
            "providers": args.providers, "repeats": args.repeats,
        }
        if args.layer:
            settings["layer"] = {"name": spec.name, "args": spec.args,
                                 "input_shapes": spec.input_shapes}
        runner.write_json(args.json, runner.results_document(results, machine, settings))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        runner.plot(args.plot, results, machine)
        print(f"wrote {args.plot}", file=sys.stderr)
    return exit_code


def _import_from_cwd(layer: str) -> None:
    """Puts the current directory on the import path for a ``module:Class`` layer.

    The console script's own directory is on ``sys.path``, not the directory it is
    run from, where a user's layer module usually is (``python -m`` would add it).
    """
    if ":" in layer and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def _profile(args) -> int:
    from fastlayers.bench import profile

    _import_from_cwd(args.layer)
    result = profile.profile_layer(
        args.layer,
        args.logdir,
        input_shape=args.input_shape,
        layer_args=args.layer_args,
        policy=args.dtype,
        implementation=None if args.implementation == "auto" else args.implementation,
        mode=args.mode,
        device=args.device,
        steps=args.steps,
    )
    print(f"wrote {result.xplane_path}")
    if result.scopes:
        print("kernel scopes in the trace: " + ", ".join(sorted(result.scopes)))
        print("run this, open Profile > trace_viewer and search for fastlayers/:")
    else:
        # A plain Keras layer runs no fastlayers kernel: its ops carry the layer's name.
        print("run this, open Profile > trace_viewer and search for the layer's ops:")
    print(f"tensorboard --logdir {args.logdir}")
    return 0


@contextlib.contextmanager
def _native_stderr_silenced():
    """Sends file descriptor 2 to /dev/null for the duration.

    While TensorFlow's native libraries load and probe for CUDA they log to fd 2
    before ``TF_CPP_MIN_LOG_LEVEL`` takes effect (on every machine without a GPU
    driver), which would bury a one-line error. Python exceptions raised inside
    propagate after fd 2 is restored, so their tracebacks still show.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


class _NoRetracingWarning(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning.

    Every benchmark case wraps its step in a new ``tf.function`` on purpose (a fresh
    trace per shape, dtype and provider); TensorFlow counts the wrappers of one
    Python function as one function retracing and warns about a problem the bench
    does not have.
    """

    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def _retracing_warning_silenced():
    import tensorflow as tf

    logger, only = tf.get_logger(), _NoRetracingWarning()
    logger.addFilter(only)
    try:
        yield
    finally:
        logger.removeFilter(only)


def main(argv=None) -> int:
    """Entry point of the ``fastlayers`` console script; returns the exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _native_stderr_silenced():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
    from fastlayers.bench.layer_spec import LayerError
    from fastlayers.bench.profile import ProfileError
    from fastlayers.bench.runner import BenchError

    argv = sys.argv[1:] if argv is None else list(argv)
    prog = f"fastlayers {argv[0]}" if argv and argv[0] in ("bench", "profile") else "fastlayers"
    try:
        args = build_parser().parse_args(argv)
        with _retracing_warning_silenced():
            if args.command == "build":
                return args.run(args)
            return _bench(args) if args.command == "bench" else _profile(args)
    except (UsageError, BenchError, ProfileError, LayerError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
