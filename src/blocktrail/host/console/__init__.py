"""The host's web console (app.py), mounted at /console beside the API."""

from blocktrail.host.console.app import PREFIX, Console

__all__ = ["PREFIX", "Console"]
