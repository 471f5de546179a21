"""Triton model templates, shipped as package data; `dspark-build repo` fills them (see README.md here)."""
