"""End-to-end flows, one module each; every flow returns a JSON-able dict.

compress (in memory, or block by block through :mod:`.offloaded`), evaluate, inspect, recipes
(the shipped presets), methods (every registered recipe method), demo, distill, export, merge,
sensitivity, auto, report. The CLI (``slimtorch.cli``) parses arguments, calls one of these
and renders its result; Python users may call them directly.
"""
