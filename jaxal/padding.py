"""Row padding on the host: one definition for every set whose size changes from call to call.

A jitted program sees each new shape as a new program. A set that grows (the labelled set) or shrinks
(the pool) is therefore padded to a size chosen by `jaxal.parallel.bucket` (the run's largest, so one
compilation per run), and the program is told which rows are real: by the weights returned here (1 for
a real row, 0 for padding) or by the real count. The padding repeats the last real row, so it holds
ordinary values (no NaN or overflow in a product it enters before being masked).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

PyTree = Any


def pad_rows(data: PyTree, size: int) -> tuple[PyTree, np.ndarray]:
    """`(padded, weights)`: every leaf of `data` (arrays with a common leading axis of n rows) padded to
    `size` rows by repeating its last row (zeros if n == 0), and float32 weights, 1 for the n real
    rows and 0 for the padding. NumPy in, NumPy out: nothing is compiled for the padding."""
    leaves = jax.tree.leaves(data)
    sizes = {np.shape(leaf)[0] for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(f"cannot pad arrays with different numbers of rows: {sorted(sizes)}")
    n = sizes.pop()
    if n > size:
        raise ValueError(f"cannot pad {n} rows to {size}")

    def pad(leaf):
        leaf = np.asarray(leaf)
        if n == 0:
            return np.zeros((size, *leaf.shape[1:]), leaf.dtype)
        return leaf[np.minimum(np.arange(size), n - 1)]

    return jax.tree.map(pad, data), (np.arange(size) < n).astype(np.float32)
