"""
The asynchronous core: error codes, chain tasks, flow chains and Deferred helpers.
"""

from zcontrol.core.asyncwhile import all_done, each, gather, retry, step
from zcontrol.core.chain import CHAIN_QUEUE_FULL, ChainTaskQueue
from zcontrol.core.errors import (
    SYS,
    ErrorCode,
    OperationError,
    error_code,
    from_failure,
    register_codes,
)
from zcontrol.core.flow import (
    FLOW_EMPTY_CHAIN,
    Flow,
    FlowChain,
    FunctionFlow,
    IFlow,
    NoRollbackFlow,
    flow,
)

__all__ = [
    "CHAIN_QUEUE_FULL",
    "FLOW_EMPTY_CHAIN",
    "SYS",
    "ChainTaskQueue",
    "ErrorCode",
    "Flow",
    "FlowChain",
    "FunctionFlow",
    "IFlow",
    "NoRollbackFlow",
    "OperationError",
    "all_done",
    "each",
    "error_code",
    "flow",
    "from_failure",
    "gather",
    "register_codes",
    "retry",
    "step",
]
