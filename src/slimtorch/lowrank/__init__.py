"""slimtorch.lowrank."""
