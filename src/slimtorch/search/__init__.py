"""slimtorch.search."""
