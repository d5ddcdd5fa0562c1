"""memprof's version: read by packaging (pyproject.toml) and written into every run record."""

__version__ = "0.1.0"
