"""The installed distribution's version, in a module of its own so that any layer can import it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("delivery-executor")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
