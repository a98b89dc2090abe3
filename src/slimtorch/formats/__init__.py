"""Compressed tensors and the on-disk artifact. Imports only slimtorch.core (and itself).

- :mod:`~slimtorch.formats.state`: the compression state of a weight (mask, quantization grid).
- :mod:`~slimtorch.formats.packing`: bit packing of codes and masks.
- :mod:`~slimtorch.formats.encoding`: per-tensor encodings (dense, bitmask, quant, quant-bitmask).
- :mod:`~slimtorch.formats.artifact`: the safetensors + JSON manifest directory, with checksums
  and atomic writes.
"""

from slimtorch.formats.artifact import Artifact, read_artifact, read_manifest, write_artifact
from slimtorch.formats.encoding import decode_tensor, encode_tensor
from slimtorch.formats.packing import pack_bits, pack_mask, unpack_bits, unpack_mask
from slimtorch.formats.sizes import artifact_bytes, dense_safetensors_bytes, describe
from slimtorch.formats.state import QuantState, WeightState, effective_weight

__all__ = [
    "Artifact",
    "QuantState",
    "WeightState",
    "artifact_bytes",
    "decode_tensor",
    "dense_safetensors_bytes",
    "describe",
    "effective_weight",
    "encode_tensor",
    "pack_bits",
    "pack_mask",
    "read_artifact",
    "read_manifest",
    "unpack_bits",
    "unpack_mask",
    "write_artifact",
]
