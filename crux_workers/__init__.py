"""crux_workers: durable flows on Celery, Redis and Postgres."""

from ._app import Crux, default_app, set_default_app
from ._compose import SwarmMessage, SwarmResult, consensus, parallel, swarm
from ._context import FlowContext, StepInfo, current_step
from ._flow import FlowHandle, FlowRun, flow
from ._models import (
    ErrorInfo,
    FlowOutcome,
    FlowState,
    Retry,
    SignalReceipt,
    SignalState,
    StepState,
)
from ._settings import Settings
from ._signals import cancel_flow, get_flow, publish_signal, signal_flow
from .errors import (
    ConfigurationError,
    CruxError,
    DuplicateFlowName,
    FlowAlreadyFinished,
    FlowIdConflict,
    FlowNotFound,
    FlowNotWaiting,
    InvalidDuration,
    InvalidInput,
    NoConsensus,
    NonDeterminismError,
    NonRetryableError,
    SignalRejected,
    StepFailed,
    StepResultNotSerializable,
    StoreError,
    UnknownFlow,
    WaitTimeout,
)

__all__ = [
    # defining and running flows
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
    # signals and state
    "cancel_flow",
    "get_flow",
    "publish_signal",
    "signal_flow",
    # immediate compositions (inside a step)
    "consensus",
    "parallel",
    "swarm",
    "SwarmMessage",
    "SwarmResult",
    # values
    "ErrorInfo",
    "FlowOutcome",
    "FlowState",
    "SignalReceipt",
    "SignalState",
    "StepState",
    # errors
    "ConfigurationError",
    "CruxError",
    "DuplicateFlowName",
    "FlowAlreadyFinished",
    "FlowIdConflict",
    "FlowNotFound",
    "FlowNotWaiting",
    "InvalidDuration",
    "InvalidInput",
    "NoConsensus",
    "NonDeterminismError",
    "NonRetryableError",
    "SignalRejected",
    "StepFailed",
    "StepResultNotSerializable",
    "StoreError",
    "UnknownFlow",
    "WaitTimeout",
]
