"""Recipes: YAML <-> typed stages. The only package that knows every method name."""

from slimtorch.recipe.recipe import (
    FormatOptions,
    Recipe,
    Stage,
    list_presets,
    load_recipe,
    parse_recipe,
)

__all__ = ["FormatOptions", "Recipe", "Stage", "list_presets", "load_recipe", "parse_recipe"]
