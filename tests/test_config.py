import pytest
from conftest import ROOT

from instructflow.config import ConfigError, Params, load_params, parse_params


def test_params_yaml_is_valid_and_equals_the_defaults():
    assert load_params(ROOT / "params.yaml") == Params()


@pytest.mark.parametrize("raw, key", [
    ({"sft": {"lr_typo": 1}}, "sft.lr_typo"),
    ({"nonsense": {}}, "nonsense"),
    ({"model": {"tiny": {"width": 3}}}, "model.tiny.width"),
    ({"data": {"labelers": [{"name": "x", "heldout": True, "mood": 1}, {"name": "y"}]}}, "data.labelers.0.mood"),
])
def test_unknown_keys_are_rejected_by_name(raw, key):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        parse_params(raw, "params.yaml")


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"collect\.k"):
        parse_params({"collect": {"k": 12}})
    with pytest.raises(ConfigError, match="heldout_categories"):
        parse_params({"data": {"heldout_categories": ["poetry"]}})
    with pytest.raises(ConfigError, match="held-out labeler"):
        parse_params({"data": {"labelers": [{"name": "a"}, {"name": "b"}]}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("sft: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_overrides_use_dotted_keys(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("sft: {epochs: 2}\n")
    params = load_params(p, {"sft.lr": 0.5, "collect.k": 4})
    assert (params.sft.epochs, params.sft.lr, params.collect.k) == (2, 0.5, 4)


def test_cli_overrides_are_validated_like_the_file(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from instructflow.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("sft: {epochs: 2}\n")
    for args, message in ((["--set", "sft.epochz=3"], "unknown key 'sft.epochz'"),
                          (["--set", "sft.epochs.x=3"], "'epochs' is not a section"),
                          (["--set", "sft"], "expected KEY=VALUE")):
        result = CliRunner().invoke(app, ["run", "--params", "params.yaml", "--stages", "data", *args])
        assert result.exit_code == 2 and message in result.output, result.output
