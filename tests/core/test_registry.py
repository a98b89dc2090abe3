import pytest

from slimtorch.core.errors import ConfigError
from slimtorch.core.registry import Registry


def test_unknown_name_lists_known_and_nearest() -> None:
    reg: Registry[int] = Registry("method")
    reg.add("prune.magnitude", 1)
    reg.add("quantize.rtn", 2)
    with pytest.raises(ConfigError) as info:
        reg.get("prune.magnitud")
    msg = str(info.value)
    assert "did you mean 'prune.magnitude'" in msg
    assert "quantize.rtn" in msg


def test_duplicate_registration_refused() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError):
        reg.add("a", 2)
    assert reg.names() == ["a"] and "a" in reg and reg.get("a") == 1
