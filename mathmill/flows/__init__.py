"""Prefect flows, one module per pipeline (synthesize, tir, curate, ...)."""
