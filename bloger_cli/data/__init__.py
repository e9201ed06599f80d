"""Data importers, filtering, re-indexing and splits (DuckDB SQL)."""
