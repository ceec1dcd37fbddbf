"""Sandboxed execution of model-written code (local fork server, HTTP server, Docker).

Filled by the sandbox issue; until then mathmill runs no model-written code at all.
"""
