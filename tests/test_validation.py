"""The shared argument checks: what they accept and the errors they raise."""

import pytest
import tensorflow as tf

from fastlayers.kernels import validation


def test_check_floating_rejects_integers():
    with pytest.raises(TypeError, match=r"`x` must have a floating dtype.*Received: x.dtype=int32"):
        validation.check_floating("x", tf.constant([1, 2]))


def test_check_same_dtype_names_the_odd_one():
    with pytest.raises(TypeError, match=r"`kernel` must have the dtype of `x` \(float32\).*kernel.dtype=float16"):
        validation.check_same_dtype("x", tf.float32, kernel=tf.ones([1], tf.float16), bias=None)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3", None])
def test_check_positive_int(bad):
    assert validation.check_positive_int("units", 3) == 3
    with pytest.raises(ValueError, match=rf"`units`, expected a positive integer. Received: units={bad!r}"):
        validation.check_positive_int("units", bad)


@pytest.mark.parametrize("bad", [0, (2,), (2, 0), (2, 2, 2), (2.0, 2), (True, 2), "22"])
def test_check_positive_pair(bad):
    assert validation.check_positive_pair("pool_size", 3) == (3, 3)
    assert validation.check_positive_pair("pool_size", [2, 3]) == (2, 3)
    with pytest.raises(ValueError, match=r"`pool_size`, expected a positive integer or a tuple of 2"):
        validation.check_positive_pair("pool_size", bad)


def test_standardize_choice_is_case_insensitive_and_names_the_choices():
    assert validation.standardize_choice("padding", "SAME", ("valid", "same")) == "same"
    with pytest.raises(ValueError, match=r"expected one of 'valid', 'same'. Received: padding='full'"):
        validation.standardize_choice("padding", "full", ("valid", "same"))
