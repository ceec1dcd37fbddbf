"""Prefect blocks for LLM endpoints, sandboxes and storage (deployments issue)."""
