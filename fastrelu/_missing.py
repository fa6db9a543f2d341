"""Why `import fastrelu` failed when its compiled extension would not load, in words a user can
act on (Python's own message is a misleading "circular import")."""
import importlib.machinery
import os


def explain(package_init, exc):
    here = os.path.dirname(os.path.abspath(package_init))
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    files = os.listdir(here)
    if any(f"_cpu{suffix}" in files for suffix in suffixes):
        return f"fastrelu's compiled extension in {here} failed to load: {exc}"
    others = sorted(f for f in files if f.startswith("_cpu.") and f.endswith(".so"))
    built_for = f" (it holds builds for other Pythons: {', '.join(others)})" if others else ""
    return (f"fastrelu's compiled extension (fastrelu._cpu) for this Python is missing from "
            f"{here}{built_for}.  If that is the source tree of a clone, imported instead of the "
            "installed package because Python was started in the clone's root, either install "
            "it editable there (pip install -e .), which builds the extension in place, or run "
            "Python from another directory.")
