"""The `slimtorch` command line."""
