"""Prefect tasks over chunks of rows, one module per stage family (pipeline issues)."""
