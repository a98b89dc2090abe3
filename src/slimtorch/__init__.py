"""slimtorch: make trained PyTorch models smaller and faster with little loss, and prove it.

import slimtorch as st
result = st.compress(model, "sparse90-int8", data=loader, loss_fn=F.cross_entropy)
st.save(result.model, "out/")
model = st.load("out/")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "compress", "data", "evaluate", "load", "save"]


def __getattr__(name: str) -> Any:
    # Lazy: importing slimtorch stays cheap and side-effect free.
    if name == "data":  # st.data(loader, loss_fn): a DataLoader as a Task
        from slimtorch.calibrate.loader import as_task

        return as_task
    if name in {"compress", "save", "load", "evaluate"}:
        from slimtorch import api

        return getattr(api, name)
    raise AttributeError(f"module 'slimtorch' has no attribute {name!r}")
