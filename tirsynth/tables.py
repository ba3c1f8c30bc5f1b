"""Arrow tables from rows of Python values and back, without importing pandas.

pyarrow converts Python sequences (`pa.array`, `pa.table`, `Table.from_pylist`) only after
asking its pandas shim whether they are pandas objects, and `pq.read_table` goes through
`pyarrow.dataset`: both import pandas when it is installed (Ray Data installs it). That
costs every `tirsynth ingest` or `info` 0.14 s and 20 MB, and makes each fork of the
process dearer (ingest forks its workers). The columns of our tables hold None, bool, int,
float or str, which are built here from buffers; anything else goes through `pa.array`.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Sequence
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq


def from_rows(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """A table whose columns are the union of the rows' keys, in first-seen order (a key
    missing from a row is null there)."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    columns = [column([row.get(name) for row in rows]) for name in names]
    return pa.Table.from_arrays(columns, names=names)


def read_rows(handle: IO[bytes]) -> list[dict[str, Any]]:
    """Rows of a Parquet file open for reading."""
    return pq.ParquetFile(handle).read().to_pylist()


def column(values: list[Any], null_type: pa.DataType | None = None) -> pa.Array:
    """The array `pa.array(values)` would give for None/bool/int/float/str values; of
    `null_type` (default: Arrow's null type) when every value is None."""
    kinds = {type(value) for value in values if value is not None}
    if not kinds:
        return pa.nulls(len(values), null_type or pa.null())
    nulls = values.count(None)
    validity = _bitmap([value is not None for value in values]) if nulls else None
    try:
        if kinds == {str}:
            data = [b"" if value is None else value.encode() for value in values]
            offsets = array.array("i", list(itertools.accumulate(map(len, data), initial=0)))
            buffers = [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))]
            return pa.Array.from_buffers(pa.string(), len(values), buffers, nulls)
        if kinds == {bool}:
            buffers = [validity, _bitmap(values)]
            return pa.Array.from_buffers(pa.bool_(), len(values), buffers, nulls)
        if kinds == {int}:
            numbers = array.array("q", [value or 0 for value in values])
            return pa.Array.from_buffers(
                pa.int64(), len(values), [validity, pa.py_buffer(numbers)], nulls
            )
        if kinds <= {int, float}:
            numbers = array.array("d", [0.0 if value is None else value for value in values])
            return pa.Array.from_buffers(
                pa.float64(), len(values), [validity, pa.py_buffer(numbers)], nulls
            )
    except OverflowError:  # an int past 64 bits, or over 2 GiB of text in one column
        pass
    return pa.array(values)


def _bitmap(flags: list[Any]) -> pa.Buffer:
    # Arrow's bit order: value i is bit i % 8 of byte i // 8.
    bits = int("".join("1" if flag else "0" for flag in reversed(flags)) or "0", 2)
    return pa.py_buffer(bits.to_bytes((len(flags) + 7) // 8, "little"))
