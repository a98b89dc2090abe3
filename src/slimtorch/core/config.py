"""Typed configuration bases. Every method config derives from StageConfig."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown fields, so a recipe typo fails with its field path."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageConfig(StrictModel):
    """Options shared by every recipe stage: which layers the stage works on.

    ``targets`` uses the target vocabulary (class name, exact module name, ``re:`` regex);
    ``None`` means every layer the method supports.
    """

    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)
