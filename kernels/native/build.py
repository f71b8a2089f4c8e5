"""Builds the native ops against the installed TensorFlow, once, into the cache.

The shared library lives in ``$FASTLAYERS_CACHE_DIR/native/<key>/`` (default
``~/.cache/fastlayers``), where ``<key>`` hashes the TensorFlow version, the
compiler's version, the flags and the sources, as ``torch.utils.cpp_extension.load``
keys its builds: a new TensorFlow, compiler or source builds anew, anything else
reuses the library. Each source compiles to its own object (so a failure names the
file), then one link makes the library. A build compiles into a temporary directory beside the final one
and renames it into place, so concurrent processes never load a half-written file.

Environment:
    CXX: the C++ compiler (default ``g++``).
    FASTLAYERS_NATIVE_CXXFLAGS: extra compiler flags, appended (e.g.
        ``-fsanitize=address``); they are part of the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

# Every op of the library: one source per kernel family, one shared library.
SOURCES = tuple(
    Path(__file__).with_name(name) for name in ("attention.cc", "normalization.cc", "dense_int8.cc")
)
# What the sources include from beside them: part of the key as the sources are.
HEADERS = (Path(__file__).with_name("isa.h"),)
LIBRARY_NAME = "fastlayers_native.so"
# The flags of the DESIGN's checked build, plus -O3 for the micro-kernels. No -march:
# the ISA is chosen at run time, per function, so the library runs on any x86-64.
# TensorFlow's headers deprecate their own error helpers: silenced, so a failed
# build's output starts with its real error.
BASE_FLAGS = ("-std=c++17", "-shared", "-fPIC", "-O3", "-Wno-deprecated-declarations")
ERROR_LINES = 12
_ERROR_LINE = re.compile(r"(^|\s)(fatal )?error:")


class BuildError(RuntimeError):
    """The native library could not be built; the message says why."""


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """Everything a build depends on: the commands and the directory its key names.

    ``flags`` compile each source; ``link_flags`` link the objects into the library.
    """

    compiler: str
    compiler_version: str
    flags: tuple[str, ...]
    link_flags: tuple[str, ...]
    directory: Path

    @property
    def library(self) -> Path:
        return self.directory / LIBRARY_NAME


def cache_root() -> Path:
    """``$FASTLAYERS_CACHE_DIR``, or ``~/.cache/fastlayers``."""
    return Path(os.environ.get("FASTLAYERS_CACHE_DIR") or Path.home() / ".cache" / "fastlayers")


def _compiler() -> tuple[str, str]:
    """The compiler's path and its version line; BuildError when there is none."""
    name = os.environ.get("CXX") or "g++"
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"no C++ compiler: CXX={name!r} is not an executable on PATH")
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except OSError as error:
        raise BuildError(f"the C++ compiler CXX={name!r} did not run: {error}") from error
    if result.returncode != 0 or not result.stdout.strip():
        raise BuildError(
            f"the C++ compiler CXX={name!r} did not report a version: "
            + (result.stderr.strip().splitlines() or ["(no output)"])[0]
        )
    return path, result.stdout.strip().splitlines()[0]


def plan() -> BuildPlan:
    """The build this process would run or reuse; BuildError without a compiler."""
    import tensorflow as tf

    compiler, version = _compiler()
    extra = tuple(shlex.split(os.environ.get("FASTLAYERS_NATIVE_CXXFLAGS", "")))
    flags = BASE_FLAGS + tuple(tf.sysconfig.get_compile_flags()) + extra
    link = tuple(tf.sysconfig.get_link_flags())
    digest = hashlib.sha256()
    for part in (tf.__version__, version, *flags, "--link", *link):
        digest.update(part.encode())
        digest.update(b"\0")
    for source in SOURCES + HEADERS:
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    directory = cache_root() / "native" / digest.hexdigest()[:20]
    return BuildPlan(compiler, version, flags, link, directory)


def _first_error_lines(output: str) -> str:
    """The compiler's first error and what follows it (warnings printed before it
    say nothing about the failure)."""
    lines = output.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if _ERROR_LINE.search(line)), 0)
    return "\n".join(lines[start : start + ERROR_LINES]) or "(no output)"


def build(build_plan: BuildPlan | None = None) -> Path:
    """Returns the built library's path, compiling it first unless it is cached.

    Raises:
        BuildError: no compiler, or the compilation failed (with its first error lines).
    """
    build_plan = build_plan or plan()
    if build_plan.library.is_file():
        return build_plan.library
    build_plan.directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=build_plan.directory.parent))
    try:
        objects, commands = [], []
        for source in SOURCES:
            objects.append(str(staging / f"{source.stem}.o"))
            commands.append(
                [build_plan.compiler, "-c", str(source), "-o", objects[-1], *build_plan.flags]
            )
        # The sources compile side by side; the first that fails is named.
        running = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for command in commands
        ]
        outputs = [process.communicate() for process in running]
        for source, process, (stdout, stderr) in zip(SOURCES, running, outputs):
            _check(process.returncode, stdout, stderr, f"compiling {source.name}")
        commands.append(
            [build_plan.compiler, *objects, "-o", str(staging / LIBRARY_NAME),
             *build_plan.flags, *build_plan.link_flags]
        )
        _run(commands[-1], f"linking {LIBRARY_NAME}")
        for obj in objects:
            os.remove(obj)
        (staging / "command.txt").write_text("".join(shlex.join(c) + "\n" for c in commands))
        try:
            os.rename(staging, build_plan.directory)
        except OSError:
            # Another process finished the same build first: its library is identical.
            if not build_plan.library.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return build_plan.library


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    _check(result.returncode, result.stdout, result.stderr, what)


def _check(returncode: int, stdout: str, stderr: str, what: str) -> None:
    if returncode != 0:
        raise BuildError(f"{what} failed (exit {returncode}): " + _first_error_lines(stderr or stdout))


_lock = threading.Lock()
_loaded = None


def load():
    """The loaded op library (``tf.load_op_library``), built first if needed.

    A process loads one library, the first it builds or finds: the ops it registers
    keep their names for the life of the process, so a second build (say, after the
    source changed on disk) could not register its own.

    Raises:
        BuildError: the library cannot be built or loaded.
    """
    global _loaded
    import tensorflow as tf

    with _lock:
        if _loaded is not None:
            return _loaded
        path = build(plan())
        try:
            _loaded = tf.load_op_library(str(path))
        except (tf.errors.NotFoundError, OSError) as error:
            raise BuildError(f"loading {path} failed: {str(error).strip().splitlines()[0]}") from error
        return _loaded


# A failed build or load, remembered: a process tries (and fails) to build only once.
_failure: str | None = None
# The kernel families that have warned of it: each warns once per process.
_warned: set[str] = set()
_state_lock = threading.Lock()


def load_once():
    """``load()``, with a failure remembered for the rest of the process.

    Raises:
        BuildError: the library cannot be built or loaded (now or at the first try).
    """
    global _failure
    with _state_lock:
        if _failure is not None:
            raise BuildError(_failure)
    try:
        return load()
    except BuildError as error:
        with _state_lock:
            _failure = str(error)
        raise


def not_built_reason(what: str) -> str | None:
    """Why the library cannot run ``what`` (a kernel, as "the native attention
    kernel") in this process: a missing compiler, a failed build, with the build
    error's first lines; None once it is loaded. The first call builds it. A failure
    warns once per process for each ``what``, so auto, which moves on to the next
    implementation, says why."""
    try:
        load_once()
    except BuildError as error:
        with _state_lock:
            warn = what not in _warned
            _warned.add(what)
        if warn:
            warnings.warn(f"fastlayers: {what} is unavailable: {error}", RuntimeWarning, stacklevel=3)
        return f"it could not be built: {error}"
    return None
