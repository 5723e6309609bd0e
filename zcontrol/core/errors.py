# -*- test-case-name: tests.test_errors -*-
"""
Error codes: the one failure value that travels through every Deferred chain, bus reply, API
response and agent failure.

An L{ErrorCode} is an immutable value with a C{code} (C{SYS.1001}, C{HOST.1000}, ...), the
catalogue C{description} of that code, free-form C{details}, an optional C{cause} (another
ErrorCode: wrapping keeps the chain, as ZStack's C{errf.instantiateErrorCode(code, cause)}) and
an C{opaque} dict for machine-readable extras. It round-trips through JSON.

In errbacks it travels as an L{OperationError}, an exception that carries the ErrorCode, so
that C{failure.value.error} is always there; L{from_failure} turns any other failure into
C{SYS.1000} (internal error) with the exception's text as details.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import attrs
from twisted.python.failure import Failure

__all__ = [
    "SYS",
    "ErrorCode",
    "OperationError",
    "describe",
    "error_code",
    "from_failure",
    "register_codes",
]


class SYS:
    """
    The system error codes of ZStack's C{SysErrors}, with their catalogue descriptions.
    """

    INTERNAL = "SYS.1000"
    TIMEOUT = "SYS.1001"
    CREATE_RESOURCE_ERROR = "SYS.1002"
    RESOURCE_NOT_FOUND = "SYS.1003"
    DELETE_RESOURCE_ERROR = "SYS.1004"
    CHANGE_RESOURCE_STATE_ERROR = "SYS.1005"
    OPERATION_ERROR = "SYS.1006"
    INVALID_ARGUMENT_ERROR = "SYS.1007"
    UNKNOWN_MESSAGE_ERROR = "SYS.1008"
    NO_ROUTE_ERROR = "SYS.1009"
    NOT_READY_ERROR = "SYS.1010"
    UNDELIVERABLE_ERROR = "SYS.1011"
    MANAGEMENT_NODE_UNAVAILABLE_ERROR = "SYS.1012"
    NO_CAPABILITY_ERROR = "SYS.1013"
    UNIMPLEMENTED = "SYS.1014"
    HTTP_ERROR = "SYS.1015"
    IO_ERROR = "SYS.1016"
    CANCEL = "SYS.1017"


_CATALOGUE: dict[str, str] = {
    SYS.INTERNAL: "An internal error happened in the system",
    SYS.TIMEOUT: "An operation timeout happened",
    SYS.CREATE_RESOURCE_ERROR: "Failed to create a resource",
    SYS.RESOURCE_NOT_FOUND: "Unable to find a resource",
    SYS.DELETE_RESOURCE_ERROR: "Failed to delete a resource",
    SYS.CHANGE_RESOURCE_STATE_ERROR: "Failed to change the state of a resource",
    SYS.OPERATION_ERROR: "Failed to perform an operation",
    SYS.INVALID_ARGUMENT_ERROR: "One or more API arguments are invalid",
    SYS.UNKNOWN_MESSAGE_ERROR: "No service can handle the message",
    SYS.NO_ROUTE_ERROR: "No route to the destination service",
    SYS.NOT_READY_ERROR: "The management node is not ready yet",
    SYS.UNDELIVERABLE_ERROR: "The message could not be delivered: the destination service is dead",
    SYS.MANAGEMENT_NODE_UNAVAILABLE_ERROR: "The management node that owns the resource is unavailable",
    SYS.NO_CAPABILITY_ERROR: "The resource has no capability for the operation",
    SYS.UNIMPLEMENTED: "The operation is not implemented",
    SYS.HTTP_ERROR: "An HTTP call failed",
    SYS.IO_ERROR: "An I/O error happened",
    SYS.CANCEL: "The operation was cancelled",
}


def register_codes(prefix: str, codes: Mapping[int, str]) -> dict[int, str]:
    """
    Add a domain's codes to the catalogue, e.g. C{register_codes("HOST", {1000: "Unable to add
    host"})} makes C{HOST.1000} known. Re-registering the same text is harmless; a different
    text for a known code is a programming error.

    @return: a mapping of number to the full code string, handy for module constants.
    """
    if not prefix.isalnum() or not prefix.isupper():
        raise ValueError(f"error-code prefix must be upper-case alphanumeric: {prefix!r}")
    out = {}
    for number, description in codes.items():
        code = f"{prefix}.{number}"
        known = _CATALOGUE.get(code)
        if known is not None and known != description:
            raise ValueError(f"{code} is already registered as {known!r}")
        _CATALOGUE[code] = description
        out[number] = code
    return out


def describe(code: str) -> str:
    """
    The catalogue description of C{code}, or a generic one for an unregistered code.
    """
    return _CATALOGUE.get(code, "Unregistered error code")


def _freeze_opaque(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return dict(value or {})


@attrs.frozen
class ErrorCode:
    """
    An immutable, JSON-serialisable error.

    @ivar code: C{"<DOMAIN>.<n>"}, e.g. C{"SYS.1001"}.
    @ivar description: the catalogue text of the code.
    @ivar details: what happened this time.
    @ivar cause: the ErrorCode this one wraps, or None.
    @ivar opaque: machine-readable extras (JSON-serialisable values).
    @ivar location: the flow or step that failed, when known.
    """

    code: str = attrs.field(validator=attrs.validators.instance_of(str))
    description: str = attrs.field(validator=attrs.validators.instance_of(str))
    details: str | None = None
    cause: ErrorCode | None = None
    opaque: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze_opaque, hash=False)
    location: str | None = None

    def wrap(self, cause: ErrorCode) -> ErrorCode:
        """
        This error with C{cause} as its cause (replacing any cause it had).
        """
        return attrs.evolve(self, cause=cause)

    def at(self, location: str) -> ErrorCode:
        """
        This error with its C{location} set.
        """
        return attrs.evolve(self, location=location)

    def root_cause(self) -> ErrorCode:
        """
        The innermost cause (ZStack's C{getRootCause}).
        """
        err = self
        while err.cause is not None:
            err = err.cause
        return err

    def chain(self) -> list[ErrorCode]:
        """
        This error and its causes, outermost first.
        """
        out, err = [], self
        while err is not None:
            out.append(err)
            err = err.cause
        return out

    def has_code(self, code: str) -> bool:
        """
        Whether this error or any of its causes has C{code}.
        """
        return any(e.code == code for e in self.chain())

    def to_dict(self) -> dict[str, Any]:
        """
        The JSON-ready form; empty fields are left out.
        """
        out: dict[str, Any] = {"code": self.code, "description": self.description}
        if self.details is not None:
            out["details"] = self.details
        if self.location is not None:
            out["location"] = self.location
        if self.opaque:
            out["opaque"] = dict(self.opaque)
        if self.cause is not None:
            out["cause"] = self.cause.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ErrorCode:
        """
        Rebuild from L{to_dict} output.

        @raise ValueError: the data is not an error code.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"an error code must be an object, not {type(data).__name__}")
        code = data.get("code")
        if not isinstance(code, str):
            raise ValueError("an error code needs a string 'code'")
        description = data.get("description")
        if description is None:
            description = describe(code)
        if not isinstance(description, str):
            raise ValueError("'description' must be a string")
        details = data.get("details")
        if details is not None and not isinstance(details, str):
            raise ValueError("'details' must be a string")
        location = data.get("location")
        if location is not None and not isinstance(location, str):
            raise ValueError("'location' must be a string")
        opaque = data.get("opaque") or {}
        if not isinstance(opaque, Mapping):
            raise ValueError("'opaque' must be an object")
        cause = data.get("cause")
        return cls(
            code=code,
            description=description,
            details=details,
            cause=None if cause is None else cls.from_dict(cause),
            opaque=opaque,
            location=location,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ErrorCode:
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        parts = [f"{self.code} {self.description}"]
        if self.details:
            parts.append(f": {self.details}")
        if self.location:
            parts.append(f" [at {self.location}]")
        if self.cause is not None:
            parts.append(f" (caused by {self.cause})")
        return "".join(parts)


def error_code(
    code: str,
    details: str | None = None,
    cause: ErrorCode | None = None,
    **opaque: Any,
) -> ErrorCode:
    """
    Build an ErrorCode with the catalogue description of C{code}, optionally wrapping C{cause}
    (ZStack's C{errf.instantiateErrorCode}).
    """
    return ErrorCode(
        code=code, description=describe(code), details=details, cause=cause, opaque=opaque
    )


class OperationError(Exception):
    """
    An exception that carries an L{ErrorCode}, so that errbacks carry it end to end
    (ZStack's C{OperationFailureException}).
    """

    def __init__(self, error: ErrorCode):
        super().__init__(str(error))
        self.error = error

    @classmethod
    def of(cls, code: str, details: str | None = None, cause: ErrorCode | None = None,
           **opaque: Any) -> OperationError:
        return cls(error_code(code, details, cause, **opaque))


def from_failure(reason: Failure | BaseException) -> ErrorCode:
    """
    The ErrorCode a failure carries, or C{SYS.1000} describing an unexpected exception
    (C{SYS.1017} for a cancellation, C{SYS.1001} for a Twisted timeout).
    """
    from twisted.internet.defer import CancelledError, TimeoutError

    exc = reason.value if isinstance(reason, Failure) else reason
    if isinstance(exc, OperationError):
        return exc.error
    if isinstance(exc, CancelledError):
        return error_code(SYS.CANCEL, str(exc) or "cancelled")
    if isinstance(exc, TimeoutError):
        return error_code(SYS.TIMEOUT, str(exc) or "timed out")
    return error_code(SYS.INTERNAL, f"{type(exc).__name__}: {exc}")
