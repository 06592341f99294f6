"""What ``crash_test`` found: one ``CrashRun`` per run, and the ``CrashReport`` over them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._models import FlowOutcome


@dataclass(slots=True)
class CrashRun:
    """One run of the flow: the clean one (``boundary`` None) or one killed at a boundary."""

    boundary: int | None
    where: str
    outcome: FlowOutcome | None
    checkpoints: list[str]
    step_calls: Counter[str]
    crashed: bool
    seconds: float = 0.0
    stuck: str | None = None

    @property
    def nondeterminism(self) -> bool:
        """The replay asked for other checkpoints than the record holds."""
        error = self.outcome.error if self.outcome is not None else None
        return error is not None and error.type.endswith("NonDeterminismError")


def outcome_key(o: FlowOutcome | None) -> Any:
    if o is None:
        return None
    return (o.status, o.result, o.error.type if o.error else None)


@dataclass(slots=True)
class CrashReport:
    """What ``crash_test`` found; ``ok`` when every run ended as the clean one did."""

    flow: str
    clean: CrashRun
    runs: list[CrashRun]
    same: Callable[[FlowOutcome | None, FlowOutcome | None], bool] = field(repr=False)

    @property
    def boundaries(self) -> int:
        """How many boundaries were tried (one run each)."""
        return len(self.runs)

    @property
    def differing(self) -> list[CrashRun]:
        """Runs that ended otherwise than the clean run (or did not end)."""
        return [r for r in self.runs if not self.same(r.outcome, self.clean.outcome)]

    @property
    def nondeterministic(self) -> list[CrashRun]:
        """Runs whose replay diverged: a NonDeterminismError, or other checkpoints."""
        runs = [self.clean, *self.runs]
        return [
            r
            for r in runs
            if r.nondeterminism or (r is not self.clean and r.checkpoints != self.clean.checkpoints)
        ]

    @property
    def reruns(self) -> dict[str, list[str]]:
        """Per step: the boundaries whose crash made its function run again (at least once)."""
        got: dict[str, list[str]] = {}
        diverged = self.nondeterministic
        for r in self.runs:
            if r in diverged:  # other steps than the clean run's: not comparable
                continue
            for step, n in r.step_calls.items():
                extra = n - self.clean.step_calls.get(step, 0)
                if extra > 0:
                    got.setdefault(step, []).append(f"{r.where} (+{extra})")
        return got

    @property
    def ok(self) -> bool:
        """The clean run ended, every run reached its outcome, none hit non-determinism."""
        return self.clean.stuck is None and not self.differing and not self.nondeterministic

    def __str__(self) -> str:
        clean = self.clean.outcome
        lines = [
            f"crash_test of flow {self.flow!r}: {'ok' if self.ok else 'PROBLEMS FOUND'}",
            f"  clean run: {clean.status if clean else 'did not end'}"
            f" after {len(self.clean.checkpoints)} checkpoints; "
            f"{self.boundaries} boundaries tried, each run resumed to its end",
        ]
        if self.clean.stuck is not None:
            lines.append(f"  THE CLEAN RUN DID NOT END: {self.clean.stuck}")
        nondeterministic = self.nondeterministic
        for r in self.differing:
            if r in nondeterministic:  # said below, once
                continue
            got = r.outcome.status if r.outcome else f"did not end ({r.stuck})"
            detail = (
                f": {r.outcome.error.type}: {r.outcome.error.message}"
                if r.outcome and r.outcome.error
                else ""
            )
            was = outcome_key(clean)
            lines.append(f"  DIFFERENT OUTCOME, killed {r.where}: {got}{detail} (clean: {was})")
        for r in nondeterministic:
            where = "clean run" if r.boundary is None else f"killed {r.where}"
            if r.nondeterminism and r.outcome is not None and r.outcome.error is not None:
                lines.append(f"  NON-DETERMINISM, {where}: {r.outcome.error.message}")
            else:
                lines.append(
                    f"  NON-DETERMINISM, {where}: checkpoints {r.checkpoints} "
                    f"differ from the clean run's {self.clean.checkpoints}"
                )
        if nondeterministic:
            lines.append(
                "  (handler code outside steps reads the clock, random numbers or the outside "
                "world: move such reads into a step, whose result is recorded)"
            )
        reruns = self.reruns
        if reruns:
            lines.append("  at-least-once cost (step functions that ran again after a crash):")
            for step, places in reruns.items():
                lines.append(f"    {step!r}: {len(places)} of {self.boundaries} runs")
                lines += [f"      killed {w}" for w in places]
        else:
            lines.append("  no step function ran twice")
        return "\n".join(lines)
