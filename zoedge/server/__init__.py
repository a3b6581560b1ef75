"""Patch server (FastAPI)."""
