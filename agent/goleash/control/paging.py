"""Pages and sizes of list responses: opaque page tokens, page sizes, the byte ceiling."""

from __future__ import annotations

import base64
import binascii

from goleash.control.limits import InvalidArgument

DEFAULT_PAGE, MAX_PAGE = 100, 1000
# A list response stays under this many bytes (clients accept 4 MiB by default).
MAX_RESPONSE_BYTES = 3 * 1024 * 1024


def encode_page_token(kind: str, position: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{position}".encode()).decode().rstrip("=")


def decode_page_token(kind: str, token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        prefix, _, pos = text.partition(":")
        if prefix == kind and int(pos) >= 0:
            return int(pos)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise InvalidArgument(
        "page_token is not one this server issued for this call; pass the "
        "next_page_token of the previous response, or nothing for the first page"
    )


def page_size(n: int) -> int:
    if n < 0:
        raise InvalidArgument(f"page_size must be >= 0 (0 means {DEFAULT_PAGE}), got {n}")
    return min(n or DEFAULT_PAGE, MAX_PAGE)
