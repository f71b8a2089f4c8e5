"""``fastlayers build``: builds the native kernels ahead of time, into the cache
where their first use would build them (``fastlayers.kernels.native.build``).
``bench.cli`` registers it; this module imports no CLI code."""

from __future__ import annotations

import argparse
import sys

HELP = "build the native kernels ahead of time"
DESCRIPTION = (
    "Compiles the native attention op against the installed TensorFlow into "
    "$FASTLAYERS_CACHE_DIR/native (default ~/.cache/fastlayers), or reuses the cached "
    "build, and prints its path and the instruction set it chose. Set CXX for another "
    "compiler and FASTLAYERS_NATIVE_CXXFLAGS for extra flags."
)
# A failed build is not a usage error (exit status 2): the command ran and failed.
EXIT_FAILED = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options: the environment (CXX, FASTLAYERS_NATIVE_CXXFLAGS) steers the build."""
    del parser


def run(args) -> int:
    """Builds (or finds) the library and prints its path, compiler and ISA; a failure
    is one ``fastlayers build: error:`` line and ``EXIT_FAILED``."""
    del args
    from fastlayers.kernels.native import attention as native_attention
    from fastlayers.kernels.native import build as build_lib

    try:
        plan = build_lib.plan()
        cached = plan.library.is_file()
        path = build_lib.build(plan)
    except build_lib.BuildError as error:
        print(f"fastlayers build: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    available, detail = native_attention.build_status()
    if not available:
        print(f"fastlayers build: error: {detail}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{'cached' if cached else 'built'}: {path}")
    print(f"compiler: {plan.compiler_version}")
    print(f"instruction set: {detail}")
    return 0
