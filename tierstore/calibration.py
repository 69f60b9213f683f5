"""The calibration text a calibrated compression reads (`compression.calibration`): the bundled one, or the user's.

The bundled text (English prose of several kinds, a letter and some JavaScript, written for tierstore) is not the
text `tierstore eval` measures with, so a calibrated format is never measured on what it was fitted to.
"""
from __future__ import annotations

import hashlib
from importlib import resources

from .errors import ConfigError

BUNDLED = "bundled"


def calibration_text(setting: str) -> str:
    """The text `compression.calibration` names; ConfigError when a file cannot be read, is empty or is not
    UTF-8."""
    if setting == BUNDLED:
        return resources.files("tierstore").joinpath("data", "calibration_text.txt").read_text(encoding="utf-8")
    try:
        with open(setting, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"compression.calibration: cannot read {setting!r}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if not text.strip():
        raise ConfigError(f"compression.calibration: {setting!r} is empty")
    return text


def text_digest(text: str) -> str:
    """A short name for a calibration text: a compressed store fitted to another text is another store."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
