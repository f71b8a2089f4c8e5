"""A kernel's own eager threshold: ``Kernel(eager_reference_below=...)`` sends an eager
auto call whose work lies below it to the reference, and one at or above it to the
table; None keeps the global ``EAGER_REFERENCE_BELOW_FLOPS``; the normalization
kernels state theirs."""

import re

import pytest
import tensorflow as tf

from fastlayers import kernels
from fastlayers.kernels import dispatch
from fastlayers.kernels.auto import EAGER_REFERENCE_BELOW, EAGER_REFERENCE_BELOW_FLOPS


def _double(x):
    return 2 * x


def _kernel(**options):
    # Work = the number of elements, as the memory-bound kernels count it.
    return dispatch.Kernel(
        "double", _double, auto={("cpu", "*"): ("xla", "graph", "reference")},
        work=lambda x: x.shape.num_elements(), **options,
    )


def _sources(kernel, x):
    with dispatch.recording() as calls:
        kernel(x)
    return [(c.selection.implementation, c.selection.source) for c in calls]


def test_a_call_just_below_the_threshold_runs_the_reference_and_one_at_it_the_table():
    kernel = _kernel(eager_reference_below=64)
    assert kernel.eager_reference_below == 64
    assert _sources(kernel, tf.ones([63])) == [("reference", "small eager call")]
    assert _sources(kernel, tf.ones([64])) == [("xla", "table")]
    assert _sources(kernel, tf.ones([65])) == [("xla", "table")]


def test_inside_a_graph_the_table_decides_whatever_the_threshold():
    kernel = _kernel(eager_reference_below=1e9)
    with dispatch.recording() as calls:
        tf.function(kernel)(tf.ones([8]))
    assert [(c.selection.implementation, c.selection.source) for c in calls] == [("xla", "table")]


def test_zero_never_takes_the_reference_and_none_keeps_the_global_threshold():
    assert _sources(_kernel(eager_reference_below=0), tf.ones([1])) == [("xla", "table")]
    default = _kernel()
    assert default.eager_reference_below == EAGER_REFERENCE_BELOW_FLOPS
    assert _sources(default, tf.ones([4])) == [("reference", "small eager call")]


@pytest.mark.parametrize("bad", [-1, float("nan"), "1e6", True, [1]])
def test_a_bad_threshold_names_the_value(bad):
    with pytest.raises(ValueError, match=rf"`eager_reference_below`.*Received: eager_reference_below={re.escape(repr(bad))}"):
        _kernel(eager_reference_below=bad)


@pytest.mark.parametrize("name", ["layer_normalization", "rms_normalization"])
def test_the_normalization_kernels_state_their_thresholds(name):
    kernel = {"layer_normalization": kernels.normalization.LAYER_NORMALIZATION,
              "rms_normalization": kernels.normalization.RMS_NORMALIZATION}[name]
    assert kernel.eager_reference_below == EAGER_REFERENCE_BELOW[name] < EAGER_REFERENCE_BELOW_FLOPS
    # 16x1024: below the global threshold, where the reference used to run eagerly.
    x = tf.ones([16, 1024])
    assert kernel.work(x, None, None, centered=name == "layer_normalization") < EAGER_REFERENCE_BELOW_FLOPS
    with dispatch.recording() as calls:
        getattr(kernels, name)(x)
    assert [c.selection.source for c in calls] == ["table"]
