"""
The asynchronous core: error codes, chain tasks, flow chains and Deferred helpers.
"""

from zcontrol.core.errors import (
    SYS,
    ErrorCode,
    OperationError,
    error_code,
    from_failure,
    register_codes,
)

__all__ = [
    "SYS",
    "ErrorCode",
    "OperationError",
    "error_code",
    "from_failure",
    "register_codes",
]
