"""Errors shared by every package."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config field holds a bad value; the message names the field and the rule."""
