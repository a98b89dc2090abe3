import pytest
from torch import nn

from slimtorch.core.errors import ConfigError
from slimtorch.core.targets import Targets, describe_model


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4), nn.MultiheadAttention(4, 2)
    )


def test_class_name_exact_name_and_regex() -> None:
    m = _model()
    mods = dict(m.named_modules())
    assert Targets.of(["Linear"]).selects("2", mods["2"])
    # subclasses match their base class name
    assert Targets.of(["Linear"]).selects("3.out_proj", mods["3.out_proj"])
    assert Targets.of(["0"]).selects("0", mods["0"])
    assert not Targets.of(["0"]).selects("2", mods["2"])
    assert Targets.of(["re:3\\..*"]).selects("3.out_proj", mods["3.out_proj"])
    assert not Targets.of(["Linear"], ignore=["re:3.*"]).selects("3.out_proj", mods["3.out_proj"])
    assert Targets.of(None).selects("2", mods["2"])


def test_bad_regex_is_config_error() -> None:
    with pytest.raises(ConfigError, match="invalid regex"):
        Targets.of(["re:(unclosed"])


def test_describe_model_counts_layers() -> None:
    desc = describe_model(_model())
    assert "Conv2d x1" in desc and "MultiheadAttention x1" in desc
