"""The error every layer raises for a bad config value, and the commands report in one line.

It lives apart from the config builders so that the data layer can raise it without importing them.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config field has a bad value; the message starts with the field's path."""
