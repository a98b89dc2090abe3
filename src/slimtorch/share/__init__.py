"""slimtorch.share: weight sharing, Deep-Compression style.

The maths is in ``codebook`` (k-means codebooks, trained centroids), ``kmeans`` and ``tie``; the
recipe stages ``share.kmeans``, ``share.finetune`` and ``share.tie`` are in
:mod:`slimtorch.share.stages` (found by discovery, see :mod:`slimtorch.core.methods`), whose
configs are importable from here.
"""

from slimtorch.share.codebook import KMeansConfig, share_weights
from slimtorch.share.stages import ShareFinetuneConfig, TieConfig
from slimtorch.share.tie import tie_parameters

__all__ = ["KMeansConfig", "ShareFinetuneConfig", "TieConfig", "share_weights", "tie_parameters"]
