"""``fastlayers build``: builds the native kernels ahead of time, into the cache
where their first use would build them (``fastlayers.kernels.native.build``)."""

from __future__ import annotations

import sys


def add_command(commands) -> None:
    """Registers ``build`` on the CLI's subparsers."""
    parser = commands.add_parser(
        "build",
        help="build the native kernels ahead of time",
        description="Compiles the native attention op against the installed TensorFlow "
        "into $FASTLAYERS_CACHE_DIR/native (default ~/.cache/fastlayers), or reuses the "
        "cached build, and prints its path and the instruction set it chose. Set CXX for "
        "another compiler and FASTLAYERS_NATIVE_CXXFLAGS for extra flags.",
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    """Builds (or finds) the library; exit status 1 with the build error on failure."""
    del args
    from fastlayers.kernels.native import attention as native_attention
    from fastlayers.kernels.native import build as build_lib

    try:
        plan = build_lib.plan()
        cached = plan.library.is_file()
        path = build_lib.build(plan)
    except build_lib.BuildError as error:
        print(f"fastlayers build: error: {error}", file=sys.stderr)
        return 1
    available, detail = native_attention.build_status()
    if not available:
        print(f"fastlayers build: error: {detail}", file=sys.stderr)
        return 1
    print(f"{'cached' if cached else 'built'}: {path}")
    print(f"compiler: {plan.compiler_version}")
    print(f"instruction set: {detail}")
    return 0
