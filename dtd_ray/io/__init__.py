"""Everything written to or read from storage (no Ray).

``schema`` (every Parquet schema and partition name), ``storage`` (URIs through pyarrow.fs,
the one atomic Parquet writer, JSON manifests), ``records`` (extraction records as numpy),
``tables`` (freq/ and maps/ tables, the reference JSON maps).
"""
