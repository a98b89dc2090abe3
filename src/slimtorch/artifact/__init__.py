"""Saving and loading compressed models, side by side: :mod:`~slimtorch.artifact.save` writes the
manifest, :mod:`~slimtorch.artifact.load` reads it (data only: no pickle, no import of a name
the file holds); :mod:`~slimtorch.artifact.resized` carries the shapes structured pruning
changed, :mod:`~slimtorch.artifact.widths` serves reordered models narrower and
:mod:`~slimtorch.artifact.kernels` swaps in int4 kernels. docs/artifact.md: the manifest schema
and the threat model."""
