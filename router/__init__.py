"""smm-router: one SMM panel API v2 in front of ranked upstream providers."""

DISTRIBUTION = "smm-router"


def __getattr__(name: str) -> str:
    """`router.__version__`, read from the installed package only when asked: importlib.metadata
    costs tens of milliseconds, and every `smm-router` command imports this package."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version(DISTRIBUTION)  # the installed package's, as pip and `--version` see it
    except PackageNotFoundError:  # run from a source tree that was never installed
        found = "0+unknown"
    globals()["__version__"] = found
    return found
