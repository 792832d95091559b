"""Clients of genserve's public HTTP API (nothing here imports the server's internals)."""
