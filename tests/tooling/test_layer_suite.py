"""`fastlayers bench --layer` rows: a drop-in for a Keras layer is measured against that
layer (`keras`, the baseline), a layer lists the implementations it runs (`native` for
the normalization layers), any other FastLayer keeps its reference as the baseline."""

import pytest
from fastlayers.bench import cases, cli, layer_spec

from fastlayers import layers


def _roles(name, input_shape):
    suite = cases.layer_suite(layer_spec.resolve_layer(name, input_shape=input_shape))
    return {provider.name: provider.role for provider in suite.providers}


@pytest.mark.parametrize("name", ["LayerNormalization", "RMSNormalization"])
def test_a_normalization_layer_runs_native_against_keras(name):
    roles = _roles(name, ((4, 8),))
    assert list(roles) == ["auto", "reference", "graph", "xla", "native", "keras"]
    assert [p for p, role in roles.items() if role == cases.BASELINE] == ["keras"]
    assert cases.keras_peer(getattr(layers, name)).__module__.startswith("keras.")


def test_a_layer_without_a_keras_peer_keeps_the_reference_as_baseline():
    assert cases.keras_peer(layers.Exponential) is None
    roles = _roles("Exponential", ((4, 8),))
    assert list(roles) == ["auto", "reference", "graph", "xla"]
    assert [p for p, role in roles.items() if role == cases.BASELINE] == ["reference"]


def test_the_cli_table_names_the_native_choice_and_compares_with_keras(capsys):
    code = cli.main(["bench", "--layer", "RMSNormalization", "--input-shape", "4,8",
                     "--repeats", "1", "--quiet", "--dtypes", "float32", "--modes", "eager"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[-2:] == ["vs", "keras"]
    rows = [line for line in lines if line.startswith("RMSNormalization 4x8 ")]
    assert [row.split()[3] for row in rows] == ["auto", "reference", "graph", "xla", "native", "keras"]
    assert "auto (native)" in rows[0]
    assert rows[-1].split()[-1] == "1.00x"
