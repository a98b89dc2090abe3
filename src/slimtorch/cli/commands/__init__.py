"""One module per ``slimtorch`` command, each with the same three functions:

- ``add_parser(sub)``: add the command and its flags to the main parser's subparsers;
- ``run(args) -> dict``: call one workflow (``slimtorch.workflows``) with the parsed flags;
- ``render(result) -> str``: the text shown without ``--json``.

Logic besides parsing and rendering belongs in the workflow. Workflows are imported inside
``run`` so that ``slimtorch --help`` stays fast.
"""
