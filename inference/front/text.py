"""Text from users (a --prompt, a prompts file, a request body), refused in one line when it is not valid Unicode:
bytes that were not UTF-8 reach Python as lone surrogates (the command line's `surrogateescape`, JSON's
"\\udcff"), which no tokenizer takes."""
from __future__ import annotations

from ...errors import InputError


def check_text(text: str, what: str) -> None:
    """InputError naming `what` and the first bad character when `text` cannot be encoded as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(text[exc.start])
        found = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"a lone surrogate U+{char:04X}"
        raise InputError(f"{what} is not valid UTF-8 text: {found} at character {exc.start + 1}") from None
