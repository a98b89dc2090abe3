"""share.tie: repeated blocks share one tensor, stored once, tied again on load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slimtorch as st
from slimtorch.core.errors import ConfigError, TargetError
from slimtorch.testing.models import example_input, tiny_stack

BLOCKS = r"re:blocks\.\d+"


def test_tied_blocks_share_one_parameter_and_the_artifact_stores_it_once(tmp_path: Path) -> None:
    model = tiny_stack()
    blocks = [dict(b.named_parameters()) for b in model.blocks]  # type: ignore[union-attr]
    mean = {k: sum(b[k].detach() for b in blocks) / 3 for k in blocks[0]}
    tied = st.compress(model, {"stages": [{"method": "share.tie", "blocks": [BLOCKS]}]}).model
    params = [dict(b.named_parameters()) for b in tied.blocks]  # type: ignore[union-attr]
    for k in params[0]:
        assert params[0][k] is params[1][k] is params[2][k]
        assert torch.allclose(params[0][k], mean[k])
    plain = st.save(model, tmp_path / "plain")
    manifest = st.save(tied, tmp_path / "tied")
    assert plain["aliases"] == {} and len(manifest["aliases"]) == 2 * len(params[0])
    assert st.api.artifact_size(tmp_path / "tied") < 0.6 * st.api.artifact_size(tmp_path / "plain")
    loaded = st.load(tmp_path / "tied", trust_factory=True)
    back = [dict(b.named_parameters()) for b in loaded.blocks]  # type: ignore[union-attr]
    assert all(back[0][k] is back[2][k] for k in back[0])
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in tied.parameters())
    x = example_input(tied)
    assert torch.equal(loaded(x), tied(x))


def test_tie_then_share_and_huffman(tmp_path: Path) -> None:
    recipe = {
        "stages": [
            {"method": "share.tie", "blocks": [BLOCKS], "reduce": "first", "params": ["up.weight"]},
            {"method": "share.kmeans", "bits": 4},
        ],
        "format": {"entropy": "huffman"},
    }
    out = st.compress(tiny_stack(), recipe).model
    assert out.blocks[0].up.weight is out.blocks[2].up.weight  # type: ignore[index,union-attr]
    assert out.blocks[0].down.weight is not out.blocks[2].down.weight  # type: ignore[index,union-attr]
    manifest = st.save(out, tmp_path / "a")
    assert set(manifest["aliases"]) == {"blocks.1.up.weight", "blocks.2.up.weight"}
    x = example_input(out)
    assert torch.equal(st.load(tmp_path / "a", trust_factory=True)(x), out(x))


def test_bad_tie_configs() -> None:
    model = tiny_stack()
    with pytest.raises(TargetError, match="at least two"):
        st.compress(model, {"stages": [{"method": "share.tie", "blocks": ["re:nothing.*"]}]})
    with pytest.raises(ConfigError, match="not present"):
        st.compress(
            model, {"stages": [{"method": "share.tie", "blocks": [BLOCKS], "params": ["nope"]}]}
        )
    pruned = {"method": "prune.magnitude", "sparsity": 0.5}
    with pytest.raises(ConfigError, match="tie before"):
        st.compress(model, {"stages": [pruned, {"method": "share.tie", "blocks": [BLOCKS]}]})
