"""The artifact config of runtime modules shaped like a Linear (in, out, bias)."""

from __future__ import annotations

from typing import Any, TypeVar

from slimtorch.core.errors import ArtifactError

L = TypeVar("L", bound="LinearShape")


class LinearShape:
    """Mixin: ``config()`` / ``from_config()`` of a module built as ``cls(in, out, bias)``."""

    in_features: int
    out_features: int
    bias: Any

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (the tensors come from the state dict)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_config(cls: type[L], cfg: dict[str, Any]) -> L:
        """Rebuild an empty module from :meth:`config` output; then ``load_state_dict``."""
        try:
            return cls(int(cfg["in_features"]), int(cfg["out_features"]), bool(cfg["bias"]))  # type: ignore[call-arg]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"bad {cls.__name__} config {cfg!r} ({exc}); it needs in_features,"
                " out_features and bias - re-save the artifact"
            ) from None
