"""Reads the lake without omrs-stream: DuckDB over current/ and pyarrow over views/obs_flat.

usage: lake_check.py LAKE EXPECTED_OBS EXPECTED_OBS_FLAT WEIGHT_CONCEPT_UUID
"""
import sys

import duckdb
import pyarrow.dataset as ds
import pyarrow as pa

lake, n_obs, n_flat, weight = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
con = duckdb.connect()
got = con.execute(f"SELECT COUNT(*) FROM read_parquet('{lake}/current/obs/*.parquet')").fetchone()[0]
assert got == n_obs, f"duckdb current/obs: {got} rows, expected {n_obs}"
# Hive partitions of the change history are visible to DuckDB too.
sites = con.execute(
    f"SELECT COUNT(DISTINCT site) FROM read_parquet('{lake}/changes/obs/*/*/*.parquet', hive_partitioning = true)"
).fetchone()[0]
assert sites >= 2, f"changes/obs sites: {sites}"
flat = ds.dataset(f"{lake}/views/obs_flat", format="parquet").to_table()
assert flat.num_rows == n_flat, f"pyarrow obs_flat: {flat.num_rows} rows, expected {n_flat}"
assert flat.schema.field("value_numeric").type == pa.float64(), flat.schema
assert pa.types.is_timestamp(flat.schema.field("obs_datetime").type), flat.schema
weights = con.execute(
    f"SELECT COUNT(*), MIN(value_numeric), MAX(value_numeric) FROM read_parquet('{lake}/views/obs_flat/*.parquet') WHERE concept_uuid = ?",
    [weight],
).fetchone()
assert weights[0] > 0 and 0 < weights[1] <= weights[2] < 500, weights
print(f"duckdb/pyarrow: {got} obs, {flat.num_rows} obs_flat rows, {weights[0]} weights in [{weights[1]}, {weights[2]}] kg")
