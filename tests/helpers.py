"""Names the test modules share (fixtures live in conftest.py).

The dtype lists and checks are fastlayers.testing's, the ones users run too.
"""

import pytest
import tensorflow as tf

from fastlayers.testing import COMPILED, IMPLEMENTATIONS, NUMPY_DTYPES, POLICIES, round_to

__all__ = ["COMPILED", "DEVICES", "IMPLEMENTATIONS", "NUMPY_DTYPES", "POLICIES", "gpu_available", "round_to"]


def gpu_available() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


DEVICES = (
    "CPU",
    pytest.param(
        "GPU",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not gpu_available(), reason="no GPU visible to TensorFlow"),
        ],
    ),
)


def each_value(*axes, ids=None):
    """The product of ``axes`` as pytest params: a subset in which every value of each
    axis occurs runs by default (the i-th combination takes each axis's value ``i``
    modulo its length), the rest of the product under ``-m slow``. For axes whose
    pairs other tests cover; ``pairwise`` where pairs matter.

    A value given as a ``pytest.param`` keeps its marks (an "auto" that only means
    something on a GPU, say) and is left out of the default subset when marked slow.
    """
    import itertools

    def unwrap(value):
        return (value.values[0], tuple(value.marks)) if isinstance(value, type(pytest.param(0))) else (value, ())

    axes = [[unwrap(value) for value in axis] for axis in axes]
    names = ids or [None] * len(axes)
    usable = [[i for i, (_, marks) in enumerate(axis) if not any(m.name == "slow" for m in marks)] or list(range(len(axis)))
              for axis in axes]
    quick = {tuple(axis[i % len(axis)] for axis in usable) for i in range(max(len(axis) for axis in usable))}
    params = []
    for combo in itertools.product(*(range(len(axis)) for axis in axes)):
        values = [axes[a][i][0] for a, i in enumerate(combo)]
        marks = [m for a, i in enumerate(combo) for m in axes[a][i][1]]
        if combo not in quick and not any(m.name == "slow" for m in marks):
            marks.append(pytest.mark.slow)
        label = "-".join((name or str)(value) for name, value in zip(names, values))
        params.append(pytest.param(*values, id=label, marks=marks))
    return params


def pairwise(*axes, ids=None):
    """The product of ``axes`` as pytest params: a subset in which every pair of
    values of any two axes occurs runs by default, the rest of the product under
    ``-m slow``.

    A bug that needs one value of an axis, or two values of two axes together,
    shows in the default run; the full product's other combinations are for the
    slow sweep. The subset is chosen greedily (each step the combination covering
    the most pairs not yet covered, the earliest of equals), so it is the same on
    every run. ``ids`` gives one function per axis naming its value (None: ``str``).
    """
    import itertools

    sizes = [len(axis) for axis in axes]
    combos = list(itertools.product(*(range(size) for size in sizes)))

    def pairs(combo):
        return {(i, combo[i], j, combo[j]) for i, j in itertools.combinations(range(len(combo)), 2)}

    uncovered = set().union(*(pairs(combo) for combo in combos))
    quick = set()
    while uncovered:
        best = max(combos, key=lambda combo: (len(pairs(combo) & uncovered), -combos.index(combo)))
        quick.add(best)
        uncovered -= pairs(best)
    if len(axes) < 2:
        quick = set(combos)
    names = ids or [None] * len(axes)
    params = []
    for combo in combos:
        values = [axis[index] for axis, index in zip(axes, combo)]
        label = "-".join((name or str)(value) for name, value in zip(names, values))
        params.append(pytest.param(*values, id=label, marks=() if combo in quick else (pytest.mark.slow,)))
    return params
