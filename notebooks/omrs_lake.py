"""Opens an omrs-stream lake in DuckDB, the way `omrs-stream query` does.

- `current."<table>"`: the current state of every table (HQ's content, in uuid space).
- `changes."<table>"`: the change history, with `site` and `date` from the hive partitions.
- `patients`, `encounters_flat`, `obs_flat`: the flattened views.
- `aggregates."<name>"`: the streaming dashboard aggregates, latest version per window, and
  `aggregates."<name>_history"`: every version (provisional, final, corrections).

The `current` and `views` symlinks are resolved once, so every query of a session reads one
snapshot even while the sink publishes a new one.
"""
import glob
import json
import os

import duckdb

DEFAULT_LAKE = "/var/lib/omrs-stream/demo/latest/lake"


def lake_path():
    """The lake in $OMRS_LAKE, or the last `omrs-stream demo` run's."""
    lake = os.environ.get("OMRS_LAKE", DEFAULT_LAKE)
    if not os.path.isdir(os.path.join(lake, "current")):
        raise SystemExit(
            f"{lake} is not an omrs-stream lake with a current state: set OMRS_LAKE, or run "
            "`omrs-stream demo` first (or `omrs-stream sink parquet --compact` on a lake)"
        )
    return os.path.realpath(lake)


def _view(con, name, directory, pattern, hive=False):
    if not glob.glob(os.path.join(directory, pattern), recursive=True):
        return False
    path = os.path.join(directory, pattern).replace("'", "''")
    con.execute(
        f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet('{path}', "
        f"hive_partitioning = {str(hive).lower()}, union_by_name = true)"
    )
    return True


def connect(lake):
    """A DuckDB connection with the lake's tables registered."""
    con = duckdb.connect()
    con.execute("CREATE SCHEMA IF NOT EXISTS current")
    con.execute("CREATE SCHEMA IF NOT EXISTS changes")
    current = os.path.realpath(os.path.join(lake, "current"))
    for d in sorted(glob.glob(os.path.join(current, "*", ""))):
        _view(con, f'current."{os.path.basename(d.rstrip("/"))}"', d, "*.parquet")
    for d in sorted(glob.glob(os.path.join(lake, "changes", "*", ""))):
        _view(con, f'changes."{os.path.basename(d.rstrip("/"))}"', d, "**/*.parquet", hive=True)
    views = os.path.realpath(os.path.join(lake, "views"))
    for d in sorted(glob.glob(os.path.join(views, "*", ""))):
        _view(con, os.path.basename(d.rstrip("/")), d, "*.parquet")
    con.execute("CREATE SCHEMA IF NOT EXISTS aggregates")
    for d in sorted(glob.glob(os.path.join(lake, "aggregates", "*", ""))):
        name = os.path.basename(d.rstrip("/"))
        if _view(con, f'aggregates."{name}_history"', d, "*.parquet"):
            # The latest version of each window (the same rule as `omrs-stream query`).
            con.execute(
                f'CREATE OR REPLACE VIEW aggregates."{name}" AS SELECT * EXCLUDE (_rn) FROM ('
                f'SELECT * EXCLUDE (_kafka_partition, _kafka_offset), ROW_NUMBER() OVER ('
                f'PARTITION BY site, window_start{_dim(con, name)} '
                f'ORDER BY _kafka_partition DESC, _kafka_offset DESC) AS _rn '
                f'FROM aggregates."{name}_history") WHERE _rn = 1'
            )
    return con


def _dim(con, name):
    """The grouping column of an aggregate besides site and window, as `, col` (or '')."""
    cols = [r[0] for r in con.sql(f'DESCRIBE aggregates."{name}_history"').fetchall()]
    dims = [c for c in cols if c.endswith("_uuid")]
    return f", {dims[0]}" if dims else ""


def last_commit(lake):
    """The newest manifest entry: its global watermark and commit time (epoch ms)."""
    entries = sorted(glob.glob(os.path.join(lake, "_manifest", "*.json")))
    for path in reversed(entries):
        with open(path) as f:
            entry = json.load(f)
        if "committed_at_ms" in entry:
            return entry
    return {}


def by_month(df, value, index="month", columns="site"):
    """One row per calendar month from the first month of `df` to its last, one column per
    `columns` value (or a single column when `columns` is None), NaN where a month has no data.

    A line chart of it shows a gap over months without data instead of a straight line across
    them: the demo dump's own history ends in 2017 and the simulated clinics write from the day
    they run, so the years between hold nothing.

    >>> import pandas as pd
    >>> df = pd.DataFrame({"month": pd.to_datetime(["2017-01-01", "2017-02-01", "2017-05-01"]),
    ...                    "site": ["a", "a", "a"], "n": [1.0, 2.0, 5.0]})
    >>> t = by_month(df, "n")
    >>> [str(m.date()) for m in t.index]
    ['2017-01-01', '2017-02-01', '2017-03-01', '2017-04-01', '2017-05-01']
    >>> [None if v != v else v for v in t["a"]]
    [1.0, 2.0, None, None, 5.0]
    """
    import pandas as pd

    if columns is None:
        table = df.set_index(index)[[value]]
    else:
        table = df.pivot(index=index, columns=columns, values=value)
    if table.empty:
        return table
    months = pd.date_range(table.index.min(), table.index.max(), freq="MS")
    return table.reindex(months)
