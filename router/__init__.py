"""smm-router: one SMM panel API v2 in front of ranked upstream providers."""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "smm-router"

try:
    __version__ = version(DISTRIBUTION)  # the installed package's, as pip and `--version` see it
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
