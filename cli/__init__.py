"""The `lorastudio` command line: the one room that imports both the core and the web app."""

if __name__ != "lorastudio.cli":  # one module, one name: never a second copy as `cli`
    raise ImportError(f"import lorastudio.cli, not {__name__} (the checkout installs as lorastudio: pip install -e .)")

from .commands import main  # noqa: E402

__all__ = ["main"]
