"""Saving and loading compressed models: the manifest, rebuilding the architecture, widths and
int4 kernels. See docs/artifact.md for the manifest schema and the threat model."""
