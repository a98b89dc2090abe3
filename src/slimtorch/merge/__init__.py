"""slimtorch.merge."""
