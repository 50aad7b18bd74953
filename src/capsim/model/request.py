"""The one flat record schema every request becomes, in a real run and in a simulated one.

Records are stored columnar (a pandas DataFrame with these columns and dtypes), never as one Python
object per request, so millions of requests fit in memory. Times are seconds from the run's start;
a time that never happened (a rejected request has no start) is NaN.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np

OUTCOMES: Final[tuple[str, ...]] = ("ok", "rejected", "timed_out", "failed")

#: Column name -> numpy dtype, in the order frames carry them.
REQUEST_COLUMNS: Final[dict[str, str]] = {
    "request_id": "int64",
    "session_id": "int64",
    "pod": "int32",  # -1: never reached a pod
    "arrival_s": "float64",  # when the client first sent it
    "start_s": "float64",  # when its batch started on the model (last attempt)
    "first_token_s": "float64",
    "end_s": "float64",  # when the client got its answer or gave up
    "batch_size": "int32",  # 0: never in a batch
    "prompt_tokens": "int32",
    "output_tokens": "int32",
    "attempts": "int32",
    "outcome": "category",
}


def empty_requests_frame() -> Any:
    """An empty DataFrame with the request columns and dtypes."""
    return requests_frame({name: np.empty(0, dtype=_numpy_dtype(d)) for name, d in REQUEST_COLUMNS.items()})


def requests_frame(columns: dict[str, Any]) -> Any:
    """Build a requests DataFrame from column arrays, checking names and casting dtypes.

    ``outcome`` may be given as strings or as integer codes into ``OUTCOMES``.
    """
    import pandas as pd

    missing = [c for c in REQUEST_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"requests frame lacks columns: {', '.join(missing)}")
    data: dict[str, Any] = {}
    for name, dtype in REQUEST_COLUMNS.items():
        col = columns[name]
        if name == "outcome":
            arr = np.asarray(col)
            if arr.dtype.kind in "iu":
                data[name] = pd.Categorical.from_codes(arr.astype(np.int8), categories=list(OUTCOMES))
            else:
                data[name] = pd.Categorical(arr.astype(str), categories=list(OUTCOMES))
        else:
            data[name] = np.asarray(col, dtype=_numpy_dtype(dtype))
    return pd.DataFrame(data)


def _numpy_dtype(dtype: str) -> str:
    return "int8" if dtype == "category" else dtype
