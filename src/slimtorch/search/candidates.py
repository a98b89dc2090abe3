"""Which configurations ``slimtorch auto`` measures: uniform recipes, budget allocations,
neighbours of the best; each turned into a trial spec with a stable id."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from slimtorch.search.allocate import Assignment, Costs
from slimtorch.search.space import (
    Config,
    RecipeOptions,
    SizeModel,
    choice,
    choice_key,
    parse_choice_key,
    to_recipe,
    trial_id,
    uniform,
)

Allocator = Callable[[Costs, int], Assignment | None]
SAFETY = 0.97  # aim 3% under the size budget: fine-tuning moves weights, and sizes with them


class Planner:
    """Builds trial specs for one search (model, output directory, measuring options)."""

    def __init__(
        self,
        model: str,
        out: Path,
        options: Any,
        sizes: SizeModel,
        costs: Costs,
        recipe_options: RecipeOptions,
        target_bytes: int,
    ) -> None:
        self.model, self.out, self.options = model, out, options
        self.sizes, self.costs, self.recipe_options = sizes, costs, recipe_options
        self.target = target_bytes
        self.meta: dict[str, dict[str, Any]] = {}
        self.ratio = 1.0  # measured / predicted bytes, from finished trials (see calibrate)
        keys = {k for table in sizes.table.values() for k in table}
        self.grid = [parse_choice_key(k) for k in sorted(keys)]

    def recipe(self, config: Config) -> dict[str, Any]:
        return to_recipe(config, self.recipe_options)

    def predicted(self, config: Config) -> int:
        """Predicted bytes on disk: the size table plus the recipe the manifest records."""
        text = json.dumps(self.recipe(config), separators=(",", ":"))
        return self.sizes.predict(config) + len(text)

    def spec(self, config: Config, label: str) -> dict[str, Any]:
        """The JSON trial spec of ``config`` (its metadata kept in ``self.meta`` by id)."""
        o = self.options
        recipe = self.recipe(config)
        data = o.data if self.recipe_options.finetune_steps else None
        measure = {
            "eval_data": o.extra.get("eval_data"),
            "runtime": o.runtime,
            "latency_batch": o.latency_batch,
            "threads": o.threads,
            "seed": o.seed,
        }
        tid = trial_id(self.model, data, recipe, measure)
        self.meta.setdefault(
            tid,
            {
                "config": config,
                "recipe": recipe,
                "label": label,
                "predicted_bytes": self.predicted(config),
            },
        )
        return {
            "id": tid,
            "model": self.model,
            "data": data,
            "out": str(self.out / "trials" / tid),
            "input": o.input,
            "recipe": recipe,
            **measure,
        }

    def calibrate(self, judged: Sequence[Mapping[str, Any]]) -> None:
        """Scale predictions by the median measured/predicted bytes of finished trials."""
        ratios = sorted(
            r["bytes"] / r["predicted_bytes"]
            for r in judged
            if r.get("status") == "ok" and r.get("bytes") and r.get("predicted_bytes")
        )
        if ratios:
            self.ratio = min(1.2, max(0.8, ratios[len(ratios) // 2]))

    def layer_budget(self, fraction: float) -> int:
        """Bytes the searched layers may take at ``fraction`` of the size target (divided by
        the calibrated measured/predicted ratio)."""
        probe = uniform(self.sizes.layers, choice(0.5, "int", 4))
        overhead = len(json.dumps(self.recipe(probe), separators=(",", ":")))
        overhead += 80 * len({(c["prune"], json.dumps(c["quant"])) for c in self.grid})
        return int(fraction * self.target * SAFETY / self.ratio) - self.sizes.fixed - overhead

    def uniform(self) -> list[tuple[Config, str]]:
        """Per quantizer of the grid, the least pruning whose uniform config fits the target."""
        found = []
        quants = {json.dumps(c["quant"], sort_keys=True): c["quant"] for c in self.grid}
        for q in quants.values():
            prunes = sorted({c["prune"] for c in self.grid if c["quant"] == q})
            for p in prunes:
                c = {"prune": p, "quant": q}
                config = uniform(self.sizes.layers, c)
                if self.predicted(config) <= self.target * SAFETY:
                    found.append((config, "uniform " + choice_key(c)))
                    break
        return found

    def allocated(self, fraction: float, allocate: Allocator) -> Config | None:
        """Least-predicted-drop per-layer config within ``fraction`` of the target."""
        budget = self.layer_budget(fraction)
        for _ in range(3):
            assign = allocate(self.costs, budget)
            if assign is None:
                return None
            config = {layer: parse_choice_key(k) for layer, k in assign.items()}
            excess = self.predicted(config) - int(fraction * self.target * SAFETY)
            if excess <= 0:
                return config
            budget -= excess
        return None

    def anchor(self, judged: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
        """The trial to refine: the best meeting every budget, else the least drop that fits
        the size target, else None."""
        ok = [r for r in judged if r.get("status") == "ok" and r.get("config")]
        fits = [r for r in ok if r.get("meets_budget")]
        if not fits:
            fits = [r for r in ok if r["bytes"] <= self.target]
        if not fits:
            return None
        return min(fits, key=lambda r: (r["drop"], r["bytes"], r["id"]))
