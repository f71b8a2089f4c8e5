"""Every fact about the machine and the TensorFlow process that dispatch depends on.

The CPU (``/proc/cpuinfo``, read once), whether TensorFlow runs oneDNN, thread
counts, versions, the auto table's platform name, whether a trace is inside an XLA
cluster or under a gradient tape, and the machine fingerprint the tuner keys its
cache by. Where only a private TensorFlow API answers a question, it is used here
and nowhere else, with a fallback that keeps every call working if the API moves.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys

import tensorflow as tf

# Platforms the auto table distinguishes. On CPU the choice depends on which
# matmul library TensorFlow runs: Eigen (TF's default on CPUs without
# AVX512-VNNI/BF16/AMX), oneDNN, or oneDNN on a CPU with native bfloat16 dot products.
PLATFORMS = ("cpu", "cpu-onednn", "cpu-onednn-bf16", "gpu")

# The ISA flags that change which implementation or tile is fastest: vector width,
# fused multiply-add, and native low-precision dot products.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """What ``/proc/cpuinfo`` says about the CPU: its model name and the ``ISA_FLAGS`` it has."""

    model: str
    flags: tuple[str, ...]


def parse_cpuinfo(text: str) -> CpuInfo:
    """The ``CpuInfo`` of a ``/proc/cpuinfo`` text (the first processor's entry)."""
    model, flags = "unknown", ()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name == "model name" and model == "unknown":
            model = value.strip() or "unknown"
        elif name == "flags" and not flags:
            present = set(value.split())
            flags = tuple(flag for flag in ISA_FLAGS if flag in present)
    return CpuInfo(model, flags)


@functools.lru_cache(maxsize=None)
def cpu_info() -> CpuInfo:
    """This machine's ``CpuInfo``; model ``"unknown"`` and no flags off Linux."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                return parse_cpuinfo(f.read())
        except OSError:
            pass
    return CpuInfo("unknown", ())


def cpu_has_native_bfloat16() -> bool:
    """Whether the CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info().flags))


@functools.lru_cache(maxsize=None)
def onednn_enabled() -> bool:
    """Whether TensorFlow's oneDNN CPU kernels are on in this process."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # the private module moved: fall back on TF's documented switch
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "0").lower() in ("1", "true")
    return bool(_pywrap_util_port.IsMklEnabled())


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


def threads() -> tuple[int, int]:
    """``(intra_op, inter_op)`` threads TensorFlow uses; 0 is read as the core count."""
    cores = os.cpu_count() or 1
    intra = tf.config.threading.get_intra_op_parallelism_threads() or cores
    inter = tf.config.threading.get_inter_op_parallelism_threads() or cores
    return intra, inter


def in_xla_context() -> bool:
    """Whether the graph being traced is compiled by XLA (``jit_compile=True``).

    TensorFlow has no public API for this; a jit-compiled function traces its body
    inside an XLA control-flow context, which a private helper reports. If that
    helper moves, the answer is False: callers then take the path that runs anywhere.
    """
    try:
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:
        return False
    if tf.executing_eagerly():
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()))


def gradient_recording() -> bool:
    """Whether a ``tf.GradientTape`` may record the ops run now (eager or being traced).

    Keras traces a training step's forward pass inside its tape, so this tells a
    kernel called there that its backward pass will run too. Private API, as
    ``in_xla_context``; if it moves the answer is False (the forward's choice).
    """
    try:
        from tensorflow.python.eager import record
    except ImportError:
        return False
    try:
        return bool(record.could_possibly_record())
    except AttributeError:
        return False


def fastlayers_version() -> str:
    """The installed fastlayers version, or ``"unknown"`` from a bare checkout."""
    from importlib import metadata

    try:
        return metadata.version("fastlayers")
    except metadata.PackageNotFoundError:
        return "unknown"


def fingerprint() -> dict:
    """What a measurement depends on: CPU model and ISA flags, threads, TensorFlow
    version, oneDNN on or off, the auto-table platform and the fastlayers version."""
    intra, inter = threads()
    info = cpu_info()
    return {
        "cpu": info.model,
        "cpu_flags": list(info.flags),
        "intra_op_threads": intra,
        "inter_op_threads": inter,
        "tensorflow": tf.__version__,
        "onednn": onednn_enabled(),
        "platform": cpu_platform(),
        "fastlayers": fastlayers_version(),
    }


def fingerprint_id(facts: dict | None = None) -> str:
    """A short stable hash of ``fingerprint()`` (or of ``facts``), used in file names."""
    text = json.dumps(fingerprint() if facts is None else facts, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
