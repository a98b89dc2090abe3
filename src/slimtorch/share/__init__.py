"""slimtorch.share."""
