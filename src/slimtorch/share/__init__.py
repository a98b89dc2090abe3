"""slimtorch.share: weight sharing, Deep-Compression style.

Importing this package registers the recipe methods ``share.kmeans`` (k-means codebooks),
``share.finetune`` (trained weight sharing) and ``share.tie`` (repeated blocks share one tensor).
"""

from slimtorch.share import codebook, tie
from slimtorch.share.codebook import share_weights
from slimtorch.share.tie import tie_parameters

__all__ = ["codebook", "share_weights", "tie", "tie_parameters"]
