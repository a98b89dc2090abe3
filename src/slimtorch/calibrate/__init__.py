"""slimtorch.calibrate."""
