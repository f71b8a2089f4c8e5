"""The ``fastlayers`` command: ``fastlayers bench``, ``fastlayers profile``, ...

``fastlayers bench`` with no arguments measures the headline cases on the CPU and
prints a table; ``fastlayers bench --layer LAYER --input-shape 64,128`` measures one
layer, a fastlayers one (``Dense``) or your own (``my_layers:MyDense``);
``fastlayers profile LAYER --logdir DIR`` writes a profiler trace for TensorBoard.
Both commands name layers one way (``fastlayers.bench.layer_spec``). Bad input is
reported as one line on stderr with exit status 2; ``--fail-on-regression`` exits
with status 1 when a case got slower.

A subcommand is one :class:`Command` passed to :func:`register`: its options, what
it runs and the pip extra it needs; it reports bad input by raising a
``fastlayers.bench.errors.CommandError``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import os
import re
import sys
from collections.abc import Callable

from fastlayers.bench import build_cli, tune
from fastlayers.bench.errors import CommandError

EXIT_REGRESSION = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(CommandError):
    """A bad option or a missing package."""


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
    "a fastlayers layer ({names}) with its row of fastlayers.bench.layer_spec.LAYER_DEFAULTS, "
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


@dataclasses.dataclass(frozen=True)
class Command:
    """One ``fastlayers`` subcommand.

    Attributes:
        name: what follows ``fastlayers`` on the command line.
        help: one line for ``fastlayers --help``.
        description: the paragraph of ``fastlayers NAME --help``.
        add_arguments: ``add_arguments(parser)`` declares the command's options.
        run: ``run(args) -> exit status``, with the parsed options.
        extra: the pip extra of fastlayers whose packages the command needs
            (checked before it runs), or None.
    """

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    extra: str | None = "bench"


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> None:
    """Adds a subcommand to ``fastlayers``; commands are listed in registration order."""
    if command.name in COMMANDS:
        raise ValueError(f"Received an invalid value for `name`, expected a new command "
                         f"name. Received: name={command.name!r} (already registered)")
    COMMANDS[command.name] = command


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_packages(extra: str) -> list[str]:
    """The distributions of fastlayers' pip extra ``extra`` that are not installed.

    Read from the installed package's metadata, so the list is setup.cfg's; empty
    when fastlayers itself is not installed (run from a source tree).
    """
    try:
        requirements = importlib.metadata.requires("fastlayers") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requirements:
        name, _, marker = requirement.partition(";")
        if re.search(rf"""extra\s*==\s*["']{re.escape(extra)}["']""", marker):
            distribution = re.match(r"[A-Za-z0-9._-]+", name.strip()).group(0)
            if _version(distribution) is None:
                missing.append(distribution)
    return missing


def build_parser() -> argparse.ArgumentParser:
    """The ``fastlayers`` parser, one subparser per registered command."""
    parser = _Parser(
        prog="fastlayers",
        description="fastlayers benchmarks and profiles.",
        epilog="Run `fastlayers COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version",
                        version=f"fastlayers {_version('fastlayers') or '(not installed)'}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                       title="commands", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_arguments(subparsers.add_parser(
            command.name, help=command.help, description=command.description))
    return parser


def _bench_arguments(bench: argparse.ArgumentParser) -> None:
    from fastlayers.bench.cases import (
        DEVICES,
        HEADLINE_POLICIES,
        LAYER_PROVIDERS,
        MODES,
        POLICIES,
        SUITES,
    )
    from fastlayers.bench.layer_spec import builtin_names

    names = ", ".join(builtin_names())
    headline = [name for name, suite in SUITES.items() if suite.headline]
    bench.add_argument("--suite", type=_csv("suite", tuple(SUITES)),
                       help=f"comma-separated suites, of {', '.join(SUITES)} "
                       f"(default: {','.join(headline)}, or none with --layer)")
    bench.add_argument("--layer", metavar="LAYER", help=LAYER_HELP.format(names=names))
    bench.add_argument("--model", metavar="FILE.keras",
                       help="time a saved functional or Sequential model against its "
                       "fastlayers.layers.accelerate copy: predict and one training step")
    bench.add_argument("--input-shape", type=_shapes, metavar="SHAPE",
                       help="with --layer or --model: " + INPUT_SHAPE_HELP)
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
                       help="comma-separated modes: eager (each call from Python), "
                       "function (calls inside a tf.function) (default: "
                       f"{','.join(MODES)})")
    bench.add_argument("--device", choices=DEVICES, default="cpu",
                       help="where inputs, weights and calls live (default: %(default)s)")
    providers = "; ".join(f"{name}: {', '.join(s.provider_names)}" for name, s in SUITES.items())
    bench.add_argument("--providers", type=_csv("provider"),
                       help=f"comma-separated providers (default: all of the suite; {providers}; "
                       f"--layer: {', '.join(LAYER_PROVIDERS)} for a FastLayer or CompiledLayer, "
                       "with reference as the baseline, or `layer` for any other Keras layer)")
    bench.add_argument("--repeats", type=_positive_int_arg, default=5,
                       help="interleaved timed rounds per case; the median is reported "
                       "(default: %(default)s)")
    bench.add_argument("--json", metavar="PATH", help="write results and the machine as JSON")
    bench.add_argument("--plot", metavar="PATH.png", help="draw throughput against size")
    bench.add_argument("--compare", metavar="OLD.json", help="compare with a --json result")
    bench.add_argument("--fail-on-regression", metavar="PCT", type=_percent,
                       help="with --compare: exit 1 if a case is more than PCT%% slower")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")


def _bench(args) -> int:
    from fastlayers.bench import cases as cases_lib
    from fastlayers.bench import files, machine, report, runner
    from fastlayers.bench.layer_spec import resolve_layer

    if args.model:
        from fastlayers.bench import model_bench

        return model_bench.main(args)
    for option, value, needs in (("--input-shape", args.input_shape, "--layer or --model"),
                                 ("--layer-args", args.layer_args, "--layer")):
        if value is not None and not args.layer:
            raise UsageError(f"argument {option}: needs {needs}")
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
            files.check_writable(path, option)
    old = files.load_results(args.compare) if args.compare else None

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
    facts = machine.machine_info()
    print(f"fastlayers bench on {machine.machine_name(facts)}", file=sys.stderr)
    results = runner.run(all_cases, args.repeats, progress=not args.quiet)

    exit_code = 0
    if old is not None:
        matched = report.attach_old(results, old)
        if matched == 0 and args.fail_on_regression is not None:
            raise UsageError(
                f"argument --compare: {args.compare} has no case in common with this run"
            )
    print(report.table(results))
    if args.fail_on_regression is not None:
        slower = report.regressions(results, args.fail_on_regression)
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
        files.write_json(args.json, files.results_document(results, facts, settings))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        from fastlayers.bench.plot import plot

        plot(args.plot, results, facts)
        print(f"wrote {args.plot}", file=sys.stderr)
    return exit_code


def _import_from_cwd(layer: str) -> None:
    """Puts the current directory on the import path for a ``module:Class`` layer.

    The console script's own directory is on ``sys.path``, not the directory it is
    run from, where a user's layer module usually is (``python -m`` would add it).
    """
    if ":" in layer and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def _profile_arguments(profile: argparse.ArgumentParser) -> None:
    from fastlayers.bench.cases import DEVICES, MODES, POLICIES
    from fastlayers.bench.layer_spec import builtin_names

    profile.add_argument("layer", help=LAYER_HELP.format(names=", ".join(builtin_names())))
    profile.add_argument("--logdir", required=True,
                         help="TensorBoard log directory; the trace is a run in it named "
                         "after the layer (<logdir>/<Class>)")
    profile.add_argument("--input-shape", type=_shapes, metavar="SHAPE", help=INPUT_SHAPE_HELP)
    profile.add_argument("--layer-args", type=_layer_args, metavar="JSON",
                         help=LAYER_ARGS_HELP.format(what="--dtype and --implementation set"))
    profile.add_argument("--dtype", choices=POLICIES, default="float32",
                         help="Keras dtype policy (default: %(default)s)")
    # dispatch.ALL_IMPLEMENTATIONS, spelled out: the CLI imports TensorFlow only after
    # setting its log level (main).
    profile.add_argument("--implementation", choices=("auto", "reference", "graph", "xla", "native"),
                         default="auto", help="(default: %(default)s)")
    profile.add_argument("--mode", choices=MODES, default="eager",
                         help="eager (each call from Python) or function (calls inside a "
                         "tf.function) (default: %(default)s)")
    profile.add_argument("--device", choices=DEVICES, default="cpu",
                         help="(default: %(default)s)")
    profile.add_argument("--steps", type=_positive_int_arg, default=5,
                         help="profiled steps, after two warm-up steps (default: %(default)s)")


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


def main(argv=None) -> int:
    """Entry point of the ``fastlayers`` console script; returns the exit status."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with _native_stderr_silenced():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
    from fastlayers.testing import expected_retracing

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    prog = f"fastlayers {argv[0]}" if argv[0] in COMMANDS else "fastlayers"
    try:
        args = parser.parse_args(argv)
        command = COMMANDS[args.command]
        missing = missing_packages(command.extra) if command.extra else []
        if missing:
            raise UsageError(
                f"needs the {command.extra} extra ({', '.join(missing)} not installed): "
                f'pip install "fastlayers[{command.extra}]"')
        # Every benchmark case wraps its step in a new tf.function on purpose (a fresh
        # trace per shape, dtype and provider), which TensorFlow takes for retracing.
        with expected_retracing():
            return command.run(args)
    except CommandError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED


register(Command(
    "bench",
    help="measure layers' throughput against Keras's and tf.matmul",
    description="Measures throughput (GFLOP/s) of fastlayers against the Keras "
    "built-in and tf.matmul, interleaving providers across repeats and taking medians "
    "(speed-ups: the median of round-by-round ratios). "
    "With --layer it measures one layer, a fastlayers layer or your own, in each of its "
    "implementations against its reference implementation, counting FLOPs with "
    "TensorFlow's op counter on a traced call (time per call when it counts none).",
    add_arguments=_bench_arguments,
    run=_bench,
))
register(Command(
    "profile",
    help="capture a TensorBoard profiler trace of a layer",
    description="Runs a few warm steps of a layer, a fastlayers layer or your own, and "
    "captures a profiler trace that TensorBoard's Profile tab opens, as a run named after "
    "the layer in --logdir. Each kernel call is under the scope "
    "fastlayers/<kernel>/<implementation>; a CompiledLayer's kernel is its class name in "
    "snake_case (MyDense: fastlayers/my_dense/xla).",
    add_arguments=_profile_arguments,
    run=_profile,
))

register(Command(
    "tune",
    help=tune.HELP,
    description=tune.DESCRIPTION,
    add_arguments=tune.add_arguments,
    run=tune.run,
))
register(Command(
    "build",
    help=build_cli.HELP,
    description=build_cli.DESCRIPTION,
    add_arguments=build_cli.add_arguments,
    run=build_cli.run,
    extra=None,
))


if __name__ == "__main__":
    sys.exit(main())
