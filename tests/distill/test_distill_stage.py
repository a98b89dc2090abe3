"""Recipe stages distill.finetune / distill.teacher / distill.shrink."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from slimtorch import api
from slimtorch.calibrate.stages import FinetuneConfig
from slimtorch.calibrate.stages import finetune as train_finetune
from slimtorch.calibrate.train import TrainOptions
from slimtorch.core.context import Context
from slimtorch.core.errors import ConfigError
from slimtorch.core.methods import Run
from slimtorch.distill.stages import (
    DistillFinetuneConfig,
    DistillTeacherConfig,
    finetune,
    teacher_stage,
)
from slimtorch.distill.trainer import DistillTask
from slimtorch.formats.state import WeightState, apply_state
from slimtorch.recipe import load_recipe
from slimtorch.testing.models import tiny_bert, tiny_cnn
from slimtorch.testing.tasks import TensorTask, tensor_task

transformers = pytest.importorskip("transformers")

RECIPE = {
    "stages": [
        {"method": "distill.shrink", "keep": [1, 3, 5]},
        {
            "method": "distill.finetune",
            "teacher": "builtin:minilm",
            "sentences": "builtin:austen+builtin:wikipedia",
            "distill": {
                "output_loss": "cosine",
                "hidden": [
                    {"student": "encoder.layer.0", "teacher": "encoder.layer.1"},
                    {"student": "encoder.layer.2", "teacher": "encoder.layer.5", "loss": "cosine"},
                ],
                "attention": [
                    {
                        "student": "encoder.layer.2.attention.self",
                        "teacher": "encoder.layer.5.attention.self",
                        "heads": "match",
                    }
                ],
            },
            "train": {"steps": 50, "lr": 1e-4},
        },
        {"method": "distill.teacher", "distill": {"temperature": 4.0, "alpha": 0.7}},
        {"method": "train.finetune", "train": {"steps": 10}},
    ]
}


def test_recipe_round_trips_through_yaml() -> None:
    rec = load_recipe(RECIPE)
    again = load_recipe(yaml.safe_load(rec.to_yaml()))
    assert again.to_dict() == rec.to_dict()
    stage = rec.stages[1].config
    assert isinstance(stage, DistillFinetuneConfig)
    assert stage.distill.attention[0].heads == "match"
    assert rec.to_dict()["stages"][0] == {"method": "distill.shrink", "keep": [1, 3, 5]}


@pytest.mark.parametrize(
    ("stage", "match"),
    [
        ({"method": "distill.shrink", "keep": []}, "keep"),
        ({"method": "distill.shrink", "keep": [0], "targets": ["Linear"]}, "not targets"),
        ({"method": "distill.teacher", "ignore": ["fc"]}, "trains nothing"),
        ({"method": "distill.finetune", "distill": {"alpha": 1.5}}, "alpha"),
        ({"method": "distill.finetune", "distill": {"temprature": 2}}, "distill.temprature"),
        ({"method": "distill.finetune", "distill": {"hidden": [{"student": "a"}]}}, "teacher"),
    ],
)
def test_bad_stage_options_fail_at_parse_time(stage: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_recipe({"stages": [stage]})


def _labels(labeller: nn.Module) -> TensorTask:
    """Random 8x8 images labelled by ``labeller``'s argmax."""
    x = torch.randn(512, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return tensor_task(x, labeller(x).argmax(1), name="labels")


def _noisy(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return out


def test_finetune_uses_run_original_and_targets() -> None:
    teacher = tiny_cnn()
    student = _noisy(teacher)
    frozen_before = student.fc1.weight.detach().clone()
    run = Run(Context(progress=False), _labels(teacher))
    config = DistillFinetuneConfig(targets=["fc2"], train=TrainOptions(steps=5, lr=1e-3))
    with pytest.raises(ConfigError, match="needs a teacher"):
        finetune(student, config, run)
    run.original = teacher  # type: ignore[attr-defined]  (what slimtorch.compress will set)
    finetune(student, config, run)
    assert torch.equal(student.fc1.weight, frozen_before)  # not a target: untouched
    assert student.fc1.weight.requires_grad  # and unfrozen afterwards
    with pytest.raises(ConfigError, match="needs data"):
        finetune(student, config, Run(Context(progress=False)))


def test_teacher_stage_makes_train_finetune_distil_and_keep_masks(tmp_path: Path) -> None:
    teacher = tiny_cnn()
    api.save(teacher, tmp_path / "teacher")  # a teacher given as an artifact directory
    student = _noisy(teacher)
    mask = torch.rand(student.fc1.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    apply_state(student.fc1, "weight", WeightState(mask=mask))
    base = _labels(teacher)
    run = Run(Context(progress=False), base)
    teacher_stage(
        student, DistillTeacherConfig(teacher=str(tmp_path / "teacher"), trust_factory=True), run
    )
    assert isinstance(run.task, DistillTask) and run.task.base is base
    loaded_teacher = run.task.teacher
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded_teacher(x), teacher(x))
    train_finetune(student, FinetuneConfig(train=TrainOptions(steps=5)), run)
    assert set(run.task.last_terms) == {"task", "output"}
    assert torch.count_nonzero(student.fc1.weight[~mask]) == 0


def test_minilm_style_shrink_then_distil_on_sentences(tmp_path: Path) -> None:
    model = tiny_bert(4, vocab=30522)
    text = tmp_path / "s.txt"
    text.write_text(
        "The quick brown fox jumps over the lazy dog. Emma was handsome, clever and rich. "
        "It is a truth universally acknowledged that a man must want a wife. "
        "Wikipedia is a free online encyclopedia written by volunteers. ",
        encoding="utf-8",
    )
    recipe = {
        "stages": [
            {"method": "distill.shrink", "keep": [1, 3]},
            {
                "method": "distill.finetune",
                "sentences": str(text),
                "distill": {
                    "hidden": [{"student": "encoder.layer.1", "teacher": "encoder.layer.3"}],
                    "attention": [
                        {
                            "student": "encoder.layer.1.attention.self",
                            "teacher": "encoder.layer.3.attention.self",
                        }
                    ],
                },
                "train": {"steps": 4, "batch_size": 4},
            },
        ]
    }
    rec = load_recipe(recipe)
    run = Run(Context(progress=False))
    run.original = copy.deepcopy(model)  # type: ignore[attr-defined]
    kept = copy.deepcopy(model.encoder.layer[3])
    for stage in rec.stages:
        stage.spec.apply(model, stage.config, run)
    assert len(model.encoder.layer) == 2
    moved = model.encoder.layer[1].output.dense.weight
    assert not torch.equal(moved, kept.output.dense.weight)  # it trained
    assert (moved - kept.output.dense.weight).abs().max() < 0.05  # from the teacher's layer 3
    assert model.config._attn_implementation == "sdpa"  # eager only while distilling
    assert run.original.config._attn_implementation == "sdpa"  # type: ignore[attr-defined]
    assert not model.encoder.layer[1]._forward_hooks


def test_text_encoder_without_data_distils_on_default_sentences(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slimtorch.calibrate.sentences import SentenceTask
    from slimtorch.distill import stages as stage

    text = tmp_path / "s.txt"
    text.write_text("The cat sat on the mat today. A dog ran far away from home. ", "utf-8")
    monkeypatch.setattr(stage, "DEFAULT_SENTENCES", str(text))
    model = tiny_bert(2, vocab=30522, hidden=16, heads=2, intermediate=24)
    run = Run(Context(progress=False))
    base = stage.base_task(DistillTeacherConfig(), run, "distill.teacher", model)
    assert isinstance(base, SentenceTask)
    assert base.sentences == ["The cat sat on the mat today.", "A dog ran far away from home."]
    with pytest.raises(ConfigError, match="needs data"):
        stage.base_task(DistillTeacherConfig(), run, "distill.teacher", tiny_cnn())


def test_minilm_preset_parses() -> None:
    rec = load_recipe("minilm-l3-distill")
    assert [s.spec.name for s in rec.stages] == ["distill.shrink", "distill.finetune"]
    shrink_cfg, finetune_cfg = rec.stages[0].config, rec.stages[1].config
    assert isinstance(finetune_cfg, DistillFinetuneConfig)
    assert shrink_cfg.keep == [1, 3, 5]  # type: ignore[attr-defined]
    teacher_layers = [p.teacher for p in finetune_cfg.distill.hidden]
    assert teacher_layers == [f"encoder.layer.{k}" for k in (1, 3, 5)]
    assert finetune_cfg.sentences is None  # sentences come from --data, else the default
