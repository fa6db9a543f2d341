"""The version, defined once: the package and pyproject.toml read it from here."""
__version__ = "0.3.0"
