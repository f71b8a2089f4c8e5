"""The machine a result was measured on: CPU model and flags, oneDNN, library versions.

Every figure is only true of the CPU it was measured on, so every table, JSON
result and plot names it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

import numpy as np
import tensorflow as tf
from fastlayers.kernels import dispatch
from fastlayers.kernels import platform as cpu_facts


def _cpu_info() -> tuple[str, list[str]]:
    info = cpu_facts.cpu_info()
    model = info.model if info.model != "unknown" else platform.processor() or platform.machine()
    return model, list(info.flags)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """The machine and library versions a result was measured with."""
    import keras

    model, flags = _cpu_info()
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "cpu_flags": flags,
        "onednn": dispatch.onednn_enabled(),
        "cpu_platform": dispatch.cpu_platform(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "fastlayers": _version("fastlayers"),
    }


def machine_name(machine: dict) -> str:
    onednn = "oneDNN on" if machine["onednn"] else "oneDNN off"
    return (
        f"{machine['cpu']} ({machine['cpu_count']} cores, {onednn}), "
        f"TF {machine['tensorflow']}"
    )
