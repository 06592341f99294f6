"""crux_workers: durable flows on Celery, Redis and Postgres.

The errors are plain Python and load with the package; every other public name is
loaded on first use (PEP 562), so importing one part of the package (the engine, the
context) does not load SQLAlchemy, Alembic, Celery or Redis.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._app import Crux, default_app, flow, set_default_app
    from ._compose import (
        SwarmMessage,
        SwarmResult,
        consensus,
        consensus_async,
        parallel,
        parallel_async,
        swarm,
        swarm_async,
    )
    from ._context import FlowContext, StepInfo, current_step
    from ._context_async import AsyncFlowContext
    from ._flow import FlowHandle, FlowRun
    from ._models import (
        ErrorInfo,
        FlowOutcome,
        FlowState,
        ForkOrigin,
        Retry,
        SignalReceipt,
        SignalState,
        StepState,
        WaitGroup,
    )
    from ._ops import fork_flow, purge_finished, retry_flow, retry_flows, waiting
    from ._settings import Settings
    from ._signals import (
        cancel_flow,
        cancel_flow_async,
        get_flow,
        get_flow_async,
        publish_signal,
        signal_flow,
        signal_flow_async,
    )

from .errors import (
    ConfigurationError,
    CrashLoop,
    CruxError,
    DuplicateFlowName,
    FlowAlreadyFinished,
    FlowIdConflict,
    FlowNotFound,
    FlowNotRetryable,
    FlowNotWaiting,
    InvalidDuration,
    InvalidInput,
    InvalidSignal,
    NoConsensus,
    NonDeterminismError,
    NonRetryableError,
    RecordRefused,
    SignalRejected,
    StepFailed,
    StepResultNotSerializable,
    StoreError,
    UnknownFlow,
    ValueTooLarge,
    WaitTimeout,
)

_WHERE: dict[str, str] = {
    "Crux": "crux_workers._app",
    "default_app": "crux_workers._app",
    "set_default_app": "crux_workers._app",
    "flow": "crux_workers._app",
    "FlowHandle": "crux_workers._flow",
    "FlowRun": "crux_workers._flow",
    "FlowContext": "crux_workers._context",
    "StepInfo": "crux_workers._context",
    "current_step": "crux_workers._context",
    "SwarmMessage": "crux_workers._compose",
    "SwarmResult": "crux_workers._compose",
    "consensus": "crux_workers._compose",
    "consensus_async": "crux_workers._compose",
    "parallel": "crux_workers._compose",
    "parallel_async": "crux_workers._compose",
    "swarm": "crux_workers._compose",
    "swarm_async": "crux_workers._compose",
    "ErrorInfo": "crux_workers._models",
    "FlowOutcome": "crux_workers._models",
    "FlowState": "crux_workers._models",
    "Retry": "crux_workers._models",
    "SignalReceipt": "crux_workers._models",
    "SignalState": "crux_workers._models",
    "StepState": "crux_workers._models",
    "ForkOrigin": "crux_workers._models",
    "WaitGroup": "crux_workers._models",
    "fork_flow": "crux_workers._ops",
    "purge_finished": "crux_workers._ops",
    "retry_flow": "crux_workers._ops",
    "retry_flows": "crux_workers._ops",
    "waiting": "crux_workers._ops",
    "Settings": "crux_workers._settings",
    "cancel_flow": "crux_workers._signals",
    "get_flow": "crux_workers._signals",
    "publish_signal": "crux_workers._signals",
    "signal_flow": "crux_workers._signals",
    "cancel_flow_async": "crux_workers._signals",
    "get_flow_async": "crux_workers._signals",
    "signal_flow_async": "crux_workers._signals",
    "AsyncFlowContext": "crux_workers._context_async",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'crux_workers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    # defining and running flows
    "AsyncFlowContext",
    "Crux",
    "FlowContext",
    "FlowHandle",
    "FlowRun",
    "Retry",
    "Settings",
    "StepInfo",
    "current_step",
    "default_app",
    "flow",
    "set_default_app",
    # signals and state (each with an async form)
    "cancel_flow",
    "cancel_flow_async",
    "get_flow",
    "get_flow_async",
    "publish_signal",
    "signal_flow",
    "signal_flow_async",
    # operating flows (docs/operations.md)
    "fork_flow",
    "purge_finished",
    "retry_flow",
    "retry_flows",
    "waiting",
    # immediate compositions (inside a step)
    "consensus",
    "parallel",
    "swarm",
    "consensus_async",
    "parallel_async",
    "swarm_async",
    "SwarmMessage",
    "SwarmResult",
    # values
    "ErrorInfo",
    "FlowOutcome",
    "FlowState",
    "ForkOrigin",
    "SignalReceipt",
    "SignalState",
    "StepState",
    "WaitGroup",
    # errors
    "ConfigurationError",
    "CrashLoop",
    "RecordRefused",
    "CruxError",
    "DuplicateFlowName",
    "FlowAlreadyFinished",
    "FlowIdConflict",
    "FlowNotFound",
    "FlowNotRetryable",
    "FlowNotWaiting",
    "InvalidDuration",
    "InvalidInput",
    "InvalidSignal",
    "NoConsensus",
    "NonDeterminismError",
    "NonRetryableError",
    "SignalRejected",
    "StepFailed",
    "StepResultNotSerializable",
    "StoreError",
    "UnknownFlow",
    "ValueTooLarge",
    "WaitTimeout",
]
