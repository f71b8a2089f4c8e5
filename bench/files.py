"""Files ``fastlayers bench`` writes and reads: checked before a run, written atomically.

``--json`` writes a results document (``FORMAT``, the machine, the settings and one
row per case); ``--compare`` reads one back.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence

from fastlayers.bench.errors import CommandError

FORMAT = "fastlayers-bench"
FORMAT_VERSION = 1


class BenchError(CommandError):
    """Bad input or an unreadable file: reported as one line, never a traceback."""


def check_writable(path: str, option: str) -> None:
    """Raises BenchError unless ``path`` can be created or replaced (checked before running)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise BenchError(f"`{option}` must be a file path, not a directory. Received: {path}")
    if not os.path.isdir(directory):
        raise BenchError(f"`{option}`: directory {directory} does not exist. Received: {path}")
    if not os.access(directory, os.W_OK):
        raise BenchError(f"`{option}`: directory {directory} is not writable. Received: {path}")


def write_atomically(path: str, option: str, write: Callable[[str], None]) -> None:
    """Writes through a temporary file in the same directory, so nothing is half-written."""
    directory = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fastlayers-", suffix=suffix)
        os.close(fd)
    except OSError as error:
        raise BenchError(f"`{option}`: cannot write {path}: {error.strerror}") from error
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:
        raise BenchError(f"`{option}`: cannot write {path}: {error.strerror}") from error
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def results_document(results: Sequence, machine: dict, settings: dict) -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "settings": settings,
        "results": [r.to_json() for r in results],
    }


def write_json(path: str, document: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=1)
            f.write("\n")

    write_atomically(path, "--json", write)


def load_results(path: str) -> dict[tuple, tuple[float | None, float | None]]:
    """``(GFLOP/s, median seconds)`` by case key from a ``--json`` file.

    Raises BenchError if the file is not a ``fastlayers bench --json`` result.
    """
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except OSError as error:
        raise BenchError(f"`--compare`: cannot read {path}: {error.strerror}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BenchError(
            f"`--compare` expects a `fastlayers bench --json` result; {path} is not JSON"
        ) from error
    if not (isinstance(document, dict) and document.get("format") == FORMAT
            and isinstance(document.get("results"), list)):
        raise BenchError(
            f"`--compare` expects a `fastlayers bench --json` result (\"format\": "
            f"\"{FORMAT}\"); {path} is not one"
        )
    old = {}
    try:
        for row in document["results"]:
            key = (row["suite"], row["size"], row["policy"], row["mode"], row["device"],
                   row["provider"])
            gflops, seconds = row.get("gflops"), row.get("median_seconds")
            if gflops is not None or seconds is not None:
                old[key] = (None if gflops is None else float(gflops),
                            None if seconds is None else float(seconds))
    except (KeyError, TypeError, ValueError) as error:
        raise BenchError(f"`--compare`: {path} has a malformed result row ({error!r})") from error
    return old
