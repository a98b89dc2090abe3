"""Shared nouns of slimtorch: configs, registries, targets, errors, context.

Imports nothing else from slimtorch.
"""

from slimtorch.core.config import StageConfig, StrictModel
from slimtorch.core.context import Context
from slimtorch.core.errors import (
    ArtifactError,
    ChecksumError,
    ConfigError,
    SlimtorchError,
    TargetError,
    UnsupportedModelError,
    UserInputError,
)
from slimtorch.core.registry import Registry
from slimtorch.core.targets import Targets

__all__ = [
    "ArtifactError",
    "ChecksumError",
    "ConfigError",
    "Context",
    "Registry",
    "SlimtorchError",
    "StageConfig",
    "StrictModel",
    "TargetError",
    "Targets",
    "UnsupportedModelError",
    "UserInputError",
]
