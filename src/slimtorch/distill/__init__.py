"""slimtorch.distill."""
