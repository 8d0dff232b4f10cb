"""JSON and MessagePack bodies, one codec for both (DESIGN §2: the answer uses the request's format
unless `Accept` says otherwise).

`decode` turns bytes into a wire struct or raises `EnvError` (400) whose message says what was
wrong and where (msgspec names the field path, e.g. "Expected `int`, got `str` - at `$.n`").
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from shared.wire import EnvError, ErrorCode

JSON = "application/json"
MSGPACK = "application/msgpack"
_MSGPACK_ALIASES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")

T = TypeVar("T")

_json_enc = msgspec.json.Encoder()
_mp_enc = msgspec.msgpack.Encoder()
_decoders: dict[tuple[type, str], Any] = {}


def media_type(content_type: str | None) -> str:
    """Normalise a Content-Type/Accept value to JSON or MSGPACK; raise 415 for anything else."""
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct in ("", "*/*", JSON, "application/*", "text/plain"):
        return JSON
    if ct in _MSGPACK_ALIASES:
        return MSGPACK
    raise EnvError(ErrorCode.UNSUPPORTED_MEDIA, f"unsupported content type {ct!r}: send {JSON} or {MSGPACK}")


def response_format(content_type: str | None, accept: str | None) -> str:
    """The answer's format: an explicit JSON/MessagePack `Accept` wins, else the request's format."""
    for part in (accept or "").split(","):
        ct = part.split(";")[0].strip().lower()
        if ct in _MSGPACK_ALIASES:
            return MSGPACK
        if ct == JSON:
            return JSON
    try:
        return media_type(content_type)
    except EnvError:
        return JSON


def encode(obj: Any, fmt: str = JSON) -> bytes:
    """Encode a wire struct (or plain data) as JSON or MessagePack."""
    return _mp_enc.encode(obj) if fmt == MSGPACK else _json_enc.encode(obj)


def sniff_format(data: bytes) -> str | None:
    """JSON or MSGPACK when a body looks like one (a JSON object or array past spaces and a UTF-8 BOM; a MessagePack
    map), else None: what a body that failed to decode was probably meant to be."""
    if data.lstrip(b" \t\r\n\xef\xbb\xbf")[:1] in (b"{", b"["):
        return JSON
    if data[:1] and (0x80 <= data[0] <= 0x8F or data[0] in (0xDE, 0xDF)):
        return MSGPACK
    return None


def format_hint(data: bytes, fmt: str) -> str:
    """When a body that failed to decode as `fmt` looks like the other format, a hint that names the Content-Type to
    send (a JSON body sent as MessagePack reads as the integer 123, which says nothing of the mistake); else ""."""
    other = sniff_format(data)
    return (
        f"; the body looks like {'JSON' if other == JSON else 'MessagePack'}: send it with Content-Type: {other}"
        if other not in (None, fmt)
        else ""
    )


def decode(data: bytes, typ: type[T], fmt: str = JSON) -> T:
    """Decode and validate `data` as `typ`; a bad body raises EnvError(400) naming what is wrong."""
    key = (typ, fmt)
    dec = _decoders.get(key)
    if dec is None:
        dec = msgspec.msgpack.Decoder(typ) if fmt == MSGPACK else msgspec.json.Decoder(typ)
        _decoders[key] = dec
    if not data:
        data = b"\x80" if fmt == MSGPACK else b"{}"  # an empty body is an empty object: all defaults
    try:
        return dec.decode(data)
    except msgspec.ValidationError as e:
        raise EnvError(ErrorCode.MALFORMED, f"invalid {typ.__name__} body: {e}{format_hint(data, fmt)}") from None
    except msgspec.DecodeError as e:
        kind = "MessagePack" if fmt == MSGPACK else "JSON"
        raise EnvError(ErrorCode.MALFORMED, f"body is not valid {kind}: {e}{format_hint(data, fmt)}") from None
    except RecursionError:  # e.g. 50k nested arrays inside tool_call.arguments
        raise EnvError(ErrorCode.MALFORMED, "body is nested too deeply") from None
