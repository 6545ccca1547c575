"""Payload columns: text and metadata stored beside each vector, as Arrow columns.

Each segment may hold a payload table with one row per vector (None: every column null). The index
keeps the union of the columns it has seen (`schema`); a segment's table holds the columns its rows
were added with, and is conformed to the index's schema when read (missing columns as nulls). Rules
for a new batch: a new column is added (null for older rows); a column whose type differs from the
stored one is refused, naming the column, except that an all-null column takes either type.
"""

from __future__ import annotations

import base64

import numpy as np
import pyarrow as pa

__all__ = ["as_table", "merged_schema", "conform", "take", "schema_to_text", "schema_from_text"]

#: Names the payload may not use: search results and `get` return the id under this name.
RESERVED = ("id",)
_MAX_SCHEMA_TEXT = 1 << 20


def as_table(metadata, rows: int) -> pa.Table:
    """A pyarrow Table from a Table, RecordBatch, pandas DataFrame, dict of columns or list of dicts,
    with exactly `rows` rows; raises TypeError or ValueError naming what is wrong."""
    if isinstance(metadata, pa.RecordBatch):
        table = pa.Table.from_batches([metadata])
    elif isinstance(metadata, pa.Table):
        table = metadata
    elif type(metadata).__name__ == "DataFrame" and hasattr(metadata, "columns"):
        table = pa.Table.from_pandas(metadata, preserve_index=False)
    elif isinstance(metadata, dict):
        table = pa.table(metadata)
    elif isinstance(metadata, (list, tuple)):
        if not all(isinstance(row, dict) for row in metadata):
            raise TypeError("metadata as a list must hold one dict per vector")
        # Columns from the union of the rows' keys, in first-seen order (pyarrow's from_pylist would
        # take the first row's keys only and drop the others silently).
        keys = list(dict.fromkeys(k for row in metadata for k in row))
        table = pa.table({k: [row.get(k) for row in metadata] for k in keys})
    else:
        raise TypeError(f"metadata must be a pyarrow Table or RecordBatch, a pandas DataFrame, a dict of columns "
                        f"or a list of dicts, got {type(metadata).__name__}")
    if table.num_rows != rows:
        raise ValueError(f"metadata has {table.num_rows} rows for {rows} vectors")
    names = table.column_names
    bad = [n for n in names if not isinstance(n, str) or not n or n in RESERVED]
    if bad:
        raise ValueError(f"metadata column names must be non-empty strings other than {RESERVED}, got {bad[:5]}")
    if len(set(names)) != len(names):
        raise ValueError(f"metadata has repeated column names: {sorted({n for n in names if names.count(n) > 1})}")
    return table.replace_schema_metadata(None)


def merged_schema(schema: pa.Schema | None, table: pa.Table) -> tuple[pa.Schema, pa.Table]:
    """The index schema after adding `table`'s columns, and `table` with all-null columns cast to the
    stored types. Raises ValueError naming a column whose type conflicts with the stored one."""
    fields = {f.name: f for f in (schema or pa.schema([]))}
    columns = {}
    for field in table.schema:
        column = table.column(field.name)
        stored = fields.get(field.name)
        if stored is None or stored.type == field.type:
            fields.setdefault(field.name, pa.field(field.name, field.type))
        elif pa.types.is_null(field.type):
            column = column.cast(stored.type)          # an all-null column takes the stored type
        elif pa.types.is_null(stored.type):
            fields[field.name] = pa.field(field.name, field.type)  # older rows were all null
        else:
            raise ValueError(f"metadata column {field.name!r} has type {field.type}, the index stores "
                             f"{stored.type} for it")
        columns[field.name] = column
    names = list(fields)  # stored columns first, in order, then the new ones
    table = pa.table({name: columns[name] for name in table.column_names})
    return pa.schema([fields[n] for n in names]), table


def conform(table: pa.Table | None, rows: int, schema: pa.Schema, columns=None) -> pa.Table:
    """`table` (or no table: `rows` null rows) with `schema`'s columns (or the named subset), in
    order, missing ones null and null-typed ones cast to the schema's type."""
    names = schema.names if columns is None else list(columns)
    out = {}
    for name in names:
        field = schema.field(name)
        if table is not None and name in table.column_names:
            column = table.column(name)
            out[name] = column if column.type == field.type else column.cast(field.type)
        else:
            out[name] = pa.nulls(rows, field.type)
    return pa.table(out, schema=pa.schema([schema.field(n) for n in names])) if names else \
        pa.table({"__rows": pa.nulls(rows)}).drop_columns(["__rows"])


def take(tables: list[tuple[pa.Table | None, int, np.ndarray]], schema: pa.Schema | None) -> pa.Table | None:
    """The rows `rows` of each (table, table rows, rows) in order, as one table with `schema` (None
    when the index has no payload)."""
    if schema is None or not len(schema):
        return None
    parts = [conform(t, n, schema).take(pa.array(np.asarray(rows, dtype=np.int64))) for t, n, rows in tables]
    return pa.concat_tables(parts).combine_chunks() if parts else conform(None, 0, schema)


def schema_to_text(schema: pa.Schema) -> str:
    """The schema in Arrow IPC form, base64 (data only: nothing in it is executed when read)."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode("ascii")


def schema_from_text(text: str) -> pa.Schema:
    """The inverse of `schema_to_text`; raises ValueError on anything that is not such a schema."""
    if not isinstance(text, str) or len(text) > _MAX_SCHEMA_TEXT:
        raise ValueError("payload schema must be a base64 string of bounded size")
    try:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text, validate=True)))
    except (ValueError, pa.ArrowException) as exc:
        raise ValueError(f"payload schema is not a valid Arrow schema: {exc}") from None
