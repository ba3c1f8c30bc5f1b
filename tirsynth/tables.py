"""Arrow tables from rows of Python values and back, without importing pandas.

pyarrow converts Python sequences (`pa.array`, `pa.table`, `Table.from_pylist`) only after
asking its pandas shim whether they are pandas objects, and `pq.read_table` goes through
`pyarrow.dataset`: both import pandas when it is installed (Ray Data installs it). That
import would be most of a small `tirsynth ingest` or `info`, and makes each fork of the
process dearer (ingest forks its workers). The columns of our tables hold None, bool, int,
float or str, which are built here from buffers; anything else goes through `pa.array`.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa


def from_rows(rows: Sequence[dict[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    """A table whose columns are `schema`'s, then the rest of the rows' keys in first-seen
    order (a key missing from a row is null there); `schema` types its columns."""
    known = list(schema.names) if schema is not None else []
    names = list(dict.fromkeys([*known, *(name for row in rows for name in row)]))
    columns = []
    for name in names:
        values = [row.get(name) for row in rows]
        if name in known:
            kind = schema.field(name).type
            columns.append(column(values, kind).cast(kind))
        else:
            columns.append(column(values))
    return pa.Table.from_arrays(columns, names=names)


def column(values: list[Any], null_type: pa.DataType | None = None) -> pa.Array:
    """The array `pa.array(values)` would give for None/bool/int/float/str values; of
    `null_type` (default: Arrow's null type) when every value is None."""
    kinds = set(map(type, values))
    nulls = values.count(None) if type(None) in kinds else 0
    kinds.discard(type(None))
    if not kinds:
        return pa.nulls(len(values), null_type or pa.null())
    validity = _bitmap([value is not None for value in values]) if nulls else None
    if kinds == {str}:
        return _strings(values, validity, nulls)
    if kinds == {bool}:
        return pa.Array.from_buffers(pa.bool_(), len(values), [validity, _bitmap(values)], nulls)
    if kinds <= {int, float}:
        numeric, code = (pa.int64(), "q") if kinds == {int} else (pa.float64(), "d")
        filled = values if not nulls else [0 if value is None else value for value in values]
        try:
            numbers = array.array(code, filled)
        except OverflowError:  # an int past 64 bits: let pyarrow decide (or refuse)
            return pa.array(values)
        return pa.Array.from_buffers(numeric, len(values), [validity, pa.py_buffer(numbers)], nulls)
    return pa.array(values)


def _strings(values: list[str | None], validity: pa.Buffer | None, nulls: int) -> pa.Array:
    text = [value or "" for value in values] if nulls else values
    joined = "".join(text)
    data = joined.encode()
    # ASCII text (the usual: keys, paths, digests) has byte offsets equal to its character
    # offsets; otherwise each value's UTF-8 length counts.
    lengths = map(len, text) if len(data) == len(joined) else (len(t.encode()) for t in text)
    offsets = np.zeros(len(text) + 1, np.int64)
    np.cumsum(np.fromiter(lengths, np.int64, len(text)), out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:  # over 2 GiB of text in one column
        return pa.array(values)
    buffers = [validity, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.string(), len(text), buffers, nulls)


def _bitmap(flags: list[Any]) -> pa.Buffer:
    # Arrow's bit order: value i is bit i % 8 of byte i // 8.
    bits = np.fromiter(map(bool, flags), bool, len(flags))
    return pa.py_buffer(np.packbits(bits, bitorder="little"))
