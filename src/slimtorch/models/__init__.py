"""Model adapters and the bundled models and data. See :mod:`slimtorch.models.registry`."""

from slimtorch.models.registry import MODELS, BuiltinModel, LoadedModel, load_model, rebuild

__all__ = ["MODELS", "BuiltinModel", "LoadedModel", "load_model", "rebuild"]
