"""CUDA tests (``python -m pytest -m cuda tests/gpu``); a package so that its conftest and helpers do not shadow tests/conftest.py."""
