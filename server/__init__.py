"""itt-server: an OpenAI-compatible HTTP server for ITT models (see docs/server.md)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("itt-server")
except PackageNotFoundError:        # running from a source tree that is not installed
    __version__ = "0.1.0"
