"""accelerate(model): a functional Transformer classifier and a Sequential CNN get
fastlayers' layers, the same outputs, and train, save and load; the original is untouched."""

import keras
import numpy as np
import pytest

from fastlayers import layers
from fastlayers.kernels.precision import tolerance
from fastlayers.layers import acceleration as accelerate_module

T, D, VOCAB, CLASSES = 12, 16, 50, 3


def transformer_classifier():
    """Embedding, a pre-norm Transformer block of Keras layers, pooling, softmax."""
    tokens = keras.Input((T,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, D)(tokens)
    x = x * D**0.5  # an op, not a layer, in the graph
    h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(h, h, use_causal_mask=True)
    x = keras.layers.Add()([x, h])
    h = keras.layers.LayerNormalization(epsilon=1e-6, gamma_initializer="random_normal")(x)
    h = keras.layers.Dense(32, activation="gelu")(h)
    h = keras.layers.Dropout(0.1)(h)
    h = keras.layers.Dense(D)(h)
    x = keras.layers.Add()([x, h])
    x = keras.layers.RMSNormalization()(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(x)
    return keras.Model(tokens, outputs, name="classifier")


def sequential_cnn():
    return keras.Sequential([
        keras.Input((12, 12, 3)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.BatchNormalization(),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(CLASSES),
    ], name="cnn")


def _tokens(rng, n=16):
    return rng.integers(0, VOCAB, (n, T)).astype("int32")


def _images(rng, n=16):
    return rng.standard_normal((n, 12, 12, 3)).astype("float32")


MODELS = [
    ("transformer", transformer_classifier, _tokens,
     {"Dense": 3, "LayerNormalization": 2, "MultiHeadAttention": 1, "RMSNormalization": 1}),
    ("cnn", sequential_cnn, _images, {"Dense": 2, "MaxPooling2D": 1}),
]


def _classes(model):
    return [type(layer) for layer in model.layers]


def _names(model):
    return [layer.name for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _counts(model):
    counts = {}
    for layer in model.layers:
        if type(layer).__module__.startswith("fastlayers."):
            counts[type(layer).__name__] = counts.get(type(layer).__name__, 0) + 1
    return counts


@pytest.mark.parametrize("name,build,data,replaced", MODELS, ids=[m[0] for m in MODELS])
def test_copy_has_our_layers_and_predicts_the_same(name, build, data, replaced, rng, capsys):
    model = build()
    x = data(rng)
    before = model.predict(x, verbose=0)
    weights = [w.copy() for w in model.get_weights()]
    classes = _classes(model)

    fast = layers.accelerate(model)

    assert _counts(fast) == replaced
    assert _counts(model) == {}
    assert _classes(model) == classes
    for kept, original in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(kept, original)
    assert _names(fast) == _names(model)
    tolerance("float32").check(fast.predict(x, verbose=0), before)
    summary = capsys.readouterr().out
    assert f"accelerate({model.name!r}): {sum(replaced.values())} of" in summary
    for layer_class in replaced:
        assert f"keras.layers.{layer_class} -> fastlayers.layers.{layer_class}" in summary


@pytest.mark.parametrize("name,build,data,replaced", MODELS, ids=[m[0] for m in MODELS])
def test_copy_trains_and_round_trips_in_safe_mode(name, build, data, replaced, rng, tmp_path):
    model = build()
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=name == "cnn"))
    x, y = data(rng, 32), rng.integers(0, CLASSES, 32)
    original = model.predict(x, verbose=0)
    fast = layers.accelerate(model, verbose=False)
    assert fast.compiled and fast.get_compile_config() == model.get_compile_config()
    history = fast.fit(x, y, epochs=4, batch_size=8, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    tolerance("float32").check(model.predict(x, verbose=0), original)  # the original did not train
    fast.save(tmp_path / "fast.keras")
    loaded = keras.saving.load_model(tmp_path / "fast.keras", safe_mode=True)
    assert _classes(loaded) == _classes(fast)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), fast.predict(x, verbose=0))


def test_mixed_precision_models_keep_their_policy(rng):
    with keras.device("cpu"):
        keras.config.set_dtype_policy("mixed_bfloat16")
        model = transformer_classifier()
    keras.config.set_dtype_policy("float32")
    x = _tokens(rng)
    fast = layers.accelerate(model, verbose=False)
    for ours, theirs in zip(fast.layers, model.layers):
        if not isinstance(theirs, keras.layers.InputLayer):
            assert (ours.name, ours.dtype_policy.name) == (theirs.name, "mixed_bfloat16")
    tolerance("bfloat16").check(fast.predict(x, verbose=0), model.predict(x, verbose=0))


def test_nested_models_are_accelerated_and_shared_layers_stay_shared(rng):
    block = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.LayerNormalization()], name="block")
    inner_in = keras.Input((8,))
    inner = keras.Model(inner_in, keras.layers.Dense(4)(block(inner_in)), name="inner")
    shared = keras.layers.Dense(8)
    inputs = keras.Input((8,))
    outputs = inner(shared(shared(inputs)))
    model = keras.Model(inputs, outputs)
    x = rng.standard_normal((5, 8)).astype("float32")

    fast = layers.accelerate(model, verbose=False)

    fast_inner = fast.get_layer("inner")
    fast_block = fast_inner.get_layer("block")
    assert isinstance(fast_inner.layers[-1], layers.Dense)
    assert [type(l) for l in fast_block.layers] == [layers.Dense, layers.LayerNormalization]
    assert type(block.layers[0]) is keras.layers.Dense
    dense_layers = [l for l in fast.layers if isinstance(l, layers.Dense)]
    assert len(dense_layers) == 1  # the shared layer is one layer, called twice
    tolerance("float32").check(fast(x), model(x))


class ScaledDense(keras.layers.Dense):
    """A user's subclass of Keras's Dense: what it computes is its own."""

    def call(self, inputs):
        return 2.0 * super().call(inputs)


def test_a_lora_dense_is_replaced_and_a_subclass_of_kerass_layer_is_kept(rng, capsys):
    inputs = keras.Input((8,))
    lora = keras.layers.Dense(4, name="lora")
    h = lora(inputs)
    lora.enable_lora(2)
    lora.lora_kernel_b.assign(rng.standard_normal((2, 4)).astype("float32"))  # a trained update
    outputs = ScaledDense(3, name="scaled")(h)
    model = keras.Model(inputs, outputs)
    x = rng.standard_normal((3, 8)).astype("float32")

    fast = layers.accelerate(model)

    assert type(fast.get_layer("lora")) is layers.Dense  # fastlayers' Dense takes LoRA
    assert fast.get_layer("lora").lora_enabled
    assert type(fast.get_layer("scaled")) is ScaledDense
    summary = capsys.readouterr().out
    assert "1 of 2 layers replaced" in summary
    assert "ScaledDense x1" in summary
    tolerance("float32").check(fast(x), model(x))


def test_verbose_false_prints_nothing(capsys):
    layers.accelerate(sequential_cnn(), verbose=False)
    assert capsys.readouterr().out == ""


def test_the_table_extends_by_name_and_skips_what_fastlayers_lacks(monkeypatch):
    table = accelerate_module.drop_ins()
    assert table[keras.layers.Dense] is layers.Dense
    assert table[keras.layers.LayerNormalization] is layers.LayerNormalization
    if hasattr(layers, "GroupQueryAttention"):
        assert table[keras.layers.GroupQueryAttention] is layers.GroupQueryAttention
    monkeypatch.setattr(accelerate_module, "DROP_INS", ("Dense", "NoSuchLayer"))
    assert accelerate_module.drop_ins() == {keras.layers.Dense: layers.Dense}


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def _holding_a_subclassed_model():
    inputs = keras.Input((3,))
    return keras.Model(inputs, Subclassed(name="custom")(inputs), name="outer")


BAD = [
    ("subclassed", lambda: layers.accelerate(Subclassed(name="custom")), ValueError,
     r"cannot copy the subclassed model 'custom' \(Subclassed\): Keras cannot clone a "
     r"subclassed model.*Build it from fastlayers.layers"),
    ("nested subclassed", lambda: layers.accelerate(_holding_a_subclassed_model()), ValueError,
     r"subclassed model 'outer > custom'"),
    ("a layer", lambda: layers.accelerate(keras.layers.Dense(2)), ValueError,
     r"expected a functional or Sequential keras.Model. Received: model=.*of type Dense"),
    ("verbose", lambda: layers.accelerate(sequential_cnn(), verbose="yes"), ValueError,
     r"Received: verbose='yes'"),
]


@pytest.mark.parametrize("thunk,error,pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(thunk, error, pattern):
    with pytest.raises(error, match=pattern):
        thunk()
