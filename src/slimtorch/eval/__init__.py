"""slimtorch.eval."""
