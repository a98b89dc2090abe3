"""Int8DynamicLSTM / Int8DynamicGRU: closeness to fp32, shapes, round trips, the stage swap."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimtorch.core.context import Context
from slimtorch.core.errors import ArtifactError, UnsupportedModelError
from slimtorch.core.methods import Run
from slimtorch.formats.state import WeightState, apply_state
from slimtorch.quantize.stages.dynamic import DynamicInt8Config, dynamic_int8
from slimtorch.runtime import RUNTIME_MODULES, Int8DynamicGRU, Int8DynamicLSTM
from slimtorch.runtime.rnn_int8 import gru_cell, lstm_cell

RUN = Run(Context(progress=False))
PAIRS = [(nn.LSTM, Int8DynamicLSTM), (nn.GRU, Int8DynamicGRU)]
TOL = 0.03  # relative error (Frobenius) of outputs and final states against fp32


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _states(s: object) -> tuple[torch.Tensor, ...]:
    return s if isinstance(s, tuple) else (s,)  # type: ignore[return-value]


@pytest.mark.parametrize("pair", PAIRS, ids=["lstm", "gru"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("layers,bidir", [(1, False), (2, True), (3, False)])
def test_close_to_fp32(pair, batch_first: bool, layers: int, bidir: bool) -> None:  # type: ignore[no-untyped-def]
    float_cls, int8_cls = pair
    torch.manual_seed(0)
    rnn = float_cls(12, 16, num_layers=layers, bidirectional=bidir, batch_first=batch_first)
    q = int8_cls.from_float(rnn.eval())
    x = torch.randn(3, 7, 12)
    with torch.no_grad():
        ref, ref_state = rnn(x)
        out, state = q(x)
    assert out.shape == ref.shape
    assert _rel(out, ref) < TOL
    for a, b in zip(_states(state), _states(ref_state), strict=True):
        assert a.shape == b.shape and _rel(a, b) < TOL


@pytest.mark.parametrize("pair", PAIRS, ids=["lstm", "gru"])
def test_initial_state_unbatched_and_no_bias(pair) -> None:  # type: ignore[no-untyped-def]
    float_cls, int8_cls = pair
    torch.manual_seed(1)
    rnn = float_cls(8, 16, num_layers=2, bidirectional=True, bias=False).eval()
    q = int8_cls.from_float(rnn)
    x = torch.randn(5, 8)  # unbatched [T, in]
    h0 = torch.randn(4, 16)
    hx = (h0, torch.randn(4, 16)) if float_cls is nn.LSTM else h0
    with torch.no_grad():
        ref, _ = rnn(x, hx)
        out, _ = q(x, hx)
    assert out.shape == ref.shape and _rel(out, ref) < TOL


def test_cells_match_torch_exactly_in_float() -> None:
    torch.manual_seed(2)
    cell = nn.LSTMCell(6, 4)
    x, h, c = torch.randn(3, 6), torch.randn(3, 4), torch.randn(3, 4)
    gi = x @ cell.weight_ih.T + cell.bias_ih
    gh = h @ cell.weight_hh.T + cell.bias_hh
    ref_h, ref_c = cell(x, (h, c))
    got_h, got_c = lstm_cell(gi, gh, h, c)
    assert torch.allclose(got_h, ref_h, atol=1e-6) and torch.allclose(got_c, ref_c, atol=1e-6)
    gcell = nn.GRUCell(6, 4)
    gi = x @ gcell.weight_ih.T + gcell.bias_ih
    gh = h @ gcell.weight_hh.T + gcell.bias_hh
    assert torch.allclose(gru_cell(gi, gh, h), gcell(x, h), atol=1e-6)


@pytest.mark.parametrize("pair", PAIRS, ids=["lstm", "gru"])
def test_config_state_dict_round_trip_is_identical(pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    float_cls, int8_cls = pair
    torch.manual_seed(3)
    q = int8_cls.from_float(float_cls(8, 16, num_layers=2, bidirectional=True).eval())
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        y, _ = q(x)
    path = tmp_path / "m.safetensors"
    save_file(q.state_dict(), str(path))
    fresh = RUNTIME_MODULES.get(int8_cls.__name__).from_config(q.config())  # type: ignore[attr-defined]
    fresh.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        assert torch.equal(fresh(x)[0], y)
    assert all(t.dtype == torch.int8 for k, t in q.state_dict().items() if "weight_int8" in k)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="proj_size"):
        Int8DynamicLSTM.from_float(nn.LSTM(4, 8, proj_size=4))
    with pytest.raises(UnsupportedModelError, match=r"replaces nn\.GRU"):
        Int8DynamicGRU.from_float(nn.LSTM(4, 8))  # type: ignore[arg-type]
    with pytest.raises(ArtifactError, match="re-save"):
        Int8DynamicGRU.from_config({"input_size": 4})
    q = Int8DynamicGRU.from_float(nn.GRU(4, 8))
    packed = nn.utils.rnn.pack_sequence([torch.randn(3, 4)])
    with pytest.raises(UnsupportedModelError, match="PackedSequence"):
        q(packed)


def test_stage_swaps_rnns_in_tiny_lstm_and_saves(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import slimtorch as st
    from slimtorch.testing.models import tiny_lstm

    model = tiny_lstm().eval()
    x = torch.randint(0, 32, (2, 9))
    with torch.no_grad():
        ref = model(x)
    fp32 = st.save(model, tmp_path / "fp32")
    dynamic_int8(model, DynamicInt8Config(rnns=True), RUN)
    assert isinstance(model.lstm, Int8DynamicLSTM) and isinstance(model.gru, Int8DynamicGRU)
    with torch.no_grad():
        out = model(x)
    assert _rel(out, ref) < TOL
    st.save(model, tmp_path / "int8")
    loaded = st.load(tmp_path / "int8", model=tiny_lstm)
    assert isinstance(loaded.lstm, Int8DynamicLSTM)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    size = sum(f.stat().st_size for f in (tmp_path / "int8").iterdir())
    fp32_size = sum(f.stat().st_size for f in (tmp_path / "fp32").iterdir())
    assert size < 0.6 * fp32_size, (size, fp32_size, fp32)


def test_stage_targets_ignore_masks_and_proj_lstm() -> None:
    from slimtorch.testing.models import tiny_lstm

    model = tiny_lstm().eval()
    dynamic_int8(model, DynamicInt8Config(targets=["GRU"], rnns=True), RUN)
    assert isinstance(model.gru, Int8DynamicGRU) and isinstance(model.lstm, nn.LSTM)
    assert isinstance(model.head, nn.Linear)

    model = tiny_lstm().eval()
    gru = model.get_submodule("gru")
    assert isinstance(gru, nn.GRU)
    w = gru.get_parameter("weight_hh_l0")
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    apply_state(gru, "weight_hh_l0", WeightState(mask=mask))
    dynamic_int8(model, DynamicInt8Config(ignore=["lstm"], rnns=True), RUN)
    q = model.get_submodule("gru")
    assert isinstance(model.get_submodule("lstm"), nn.LSTM) and isinstance(q, Int8DynamicGRU)
    assert bool((q.hh[0].get_buffer("weight_int8")[~mask] == 0).all())

    proj = nn.Sequential(nn.LSTM(4, 8, proj_size=4), nn.Linear(4, 4))
    dynamic_int8(proj, DynamicInt8Config(rnns=True), RUN)  # the projected LSTM is left in float
    assert isinstance(proj[0], nn.LSTM)


def test_rnns_stay_float_unless_asked() -> None:
    from slimtorch.testing.models import tiny_lstm

    model = tiny_lstm()
    dynamic_int8(model, DynamicInt8Config(), RUN)
    assert not any(isinstance(m, (Int8DynamicLSTM, Int8DynamicGRU)) for m in model.modules())
    assert any(isinstance(m, torch.nn.LSTM) for m in model.modules())
