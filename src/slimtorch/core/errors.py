"""Error types. Every error a user can cause derives from UserInputError (CLI exit code 2)."""


class SlimtorchError(Exception):
    """Base of all slimtorch errors."""


class UserInputError(SlimtorchError, ValueError):
    """Bad input from the user: a recipe, a model, a path, data. The message says how to fix it."""


class ConfigError(UserInputError):
    """A recipe or method configuration is invalid."""


class TargetError(UserInputError):
    """Targets matched nothing, or matched layers the method cannot handle."""


class UnsupportedModelError(UserInputError):
    """The model has nothing the method can work on, or holds invalid values (NaN, Inf)."""


class ArtifactError(UserInputError):
    """An artifact on disk is missing, malformed, or cannot be written."""


class ChecksumError(ArtifactError):
    """A file of an artifact does not match the checksum its manifest records."""
