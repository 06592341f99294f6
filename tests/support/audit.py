"""What the fault tests check after a run: the audit of the record and the effects.

The audit reads the record straight from Postgres and the effects the flows wrote, and
checks the invariants every fault must leave intact (figures: tests/support/report.py).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field

from tests.support.effects import Event
from tests.support.fleet import FaultFleet


@dataclass
class Audit:
    """What the record and the effects say about a set of flows after a fault test."""

    flows: int = 0
    lost: list[str] = field(default_factory=list)  # missing, or not in their expected status
    committed_steps: int = 0
    step_calls: int = 0  # every recorded start of a step function
    interrupted: int = 0  # calls that never committed (crashed or refused), legitimately re-run
    rerun_after_commit: list[str] = field(default_factory=list)
    double_commits: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # committed result from no recorded call
    broken_history: list[str] = field(default_factory=list)  # checkpoints not 0..next_seq-1
    crashes: list[str] = field(default_factory=list)  # worker processes that died unasked
    task_errors: list[str] = field(default_factory=list)  # tasks that raised unexpectedly

    def assert_ok(self, *, allowed_task_errors: tuple[str, ...] = ()) -> None:
        """Assert every invariant; ``allowed_task_errors``: patterns a fault explains."""
        assert self.lost == [], f"flows lost or in the wrong status: {self.lost[:10]}"
        assert self.double_commits == [], f"double commits: {self.double_commits[:10]}"
        assert self.rerun_after_commit == [], (
            f"committed steps that ran again: {self.rerun_after_commit[:10]}"
        )
        assert self.unmatched == [], f"commits matching no recorded call: {self.unmatched[:10]}"
        assert self.broken_history == [], f"histories with holes: {self.broken_history[:10]}"
        assert self.crashes == [], f"worker crashes: {self.crashes[:10]}"
        unexplained = [
            e for e in self.task_errors if not any(re.search(p, e) for p in allowed_task_errors)
        ]
        assert unexplained == [], f"tasks that raised: {unexplained[:10]}"

    def figures(self) -> dict[str, int]:
        return {
            "lost": len(self.lost),
            "committed_steps": self.committed_steps,
            "step_calls": self.step_calls,
            "interrupted_reruns": self.interrupted,
            "reruns_after_commit": len(self.rerun_after_commit),
            "double_commits": len(self.double_commits),
            "crashes": len(self.crashes),
            "task_errors": len(self.task_errors),
        }


_EXIT = re.compile(r"pid:(\d+) exited with")


def audit(fleet: FaultFleet, expected: dict[str, str]) -> Audit:
    """Check the invariants over ``expected`` (flow id -> the status it must end in).

    - lost: a flow missing from the record or not in its expected status;
    - double commits: more than one ``crux_steps`` row per (flow, name, occurrence), read
      straight from Postgres;
    - re-run after commit: a step function that started after that step's commit time
      (attempts interrupted before their commit may run again, later ones may not);
    - unmatched: a committed result whose token no recorded call produced;
    - broken history: a flow whose checkpoints are not exactly seq 0 .. next_seq - 1;
    - crashes: a worker process, or a pool process, that died without the test killing it.
    """
    a = Audit(flows=len(expected))
    st = fleet.statuses()
    a.lost = [
        f"{i}: {st.get(i, 'MISSING')} (want {want})"
        for i, want in expected.items()
        if st.get(i) != want
    ]
    ids = list(expected)
    rows = fleet.query(
        "SELECT flow_id, name, occurrence, count(*), max(completed_at), max(result) "
        "FROM crux_steps WHERE flow_id = ANY(%s) AND kind = 'step' "
        "GROUP BY flow_id, name, occurrence",
        [ids],
    )
    starts: dict[tuple[str, str, int], list[Event]] = defaultdict(list)
    wanted = set(ids)
    for e in fleet.effects.events():
        if e.kind == "start" and e.flow_id in wanted:
            starts[(e.flow_id, e.name, e.occurrence)].append(e)
    committed = set()
    for flow_id, name, occ, count, completed_at, result in rows:
        key = (flow_id, name, occ)
        committed.add(key)
        a.committed_steps += 1
        if count != 1:
            a.double_commits.append(f"{key} committed {count} times")
        calls = starts.get(key, [])
        at = completed_at.timestamp()
        a.rerun_after_commit += [
            f"{key} committed at {at:.6f}, called again at {e.t:.6f} by pid {e.pid} "
            f"(attempt {e.attempt})"
            for e in calls
            if e.t > at
        ]
        if sum(1 for e in calls if e.token in result) != 1:
            a.unmatched.append(f"{key} result {result[:80]} not from exactly one recorded call")
    for flow_id, next_seq, count, first, last in fleet.query(
        "SELECT f.id, f.next_seq, count(s.seq), min(s.seq), max(s.seq) FROM crux_flows f "
        "LEFT JOIN crux_steps s ON s.flow_id = f.id WHERE f.id = ANY(%s) "
        "GROUP BY f.id, f.next_seq",
        [ids],
    ):
        if count != next_seq or (count and (first, last) != (0, next_seq - 1)):
            a.broken_history.append(
                f"{flow_id}: next_seq {next_seq}, seqs {first}..{last} ({count} rows)"
            )
    for key, calls in starts.items():
        a.step_calls += len(calls)
        a.interrupted += len(calls) - (1 if key in committed else 0)
    a.crashes = crashes(fleet)
    a.task_errors = task_errors(fleet)
    return a


def crashes(fleet: FaultFleet) -> list[str]:
    """Worker processes that died although the test did not kill them."""
    out = []
    for w in fleet.workers:
        code = w.proc.poll()
        if code is not None and w.proc.pid not in fleet.killed:
            out.append(f"worker {w.name} (pid {w.proc.pid}) exited with {code}")
        text = w.log.read_text(errors="replace") if w.log.exists() else ""
        for m in _EXIT.finditer(text):
            if int(m.group(1)) not in fleet.killed:
                line = text[text.rfind("\n", 0, m.start()) + 1 : text.find("\n", m.end())]
                out.append(f"{w.name}: {line.strip()}")
    return out


def task_errors(fleet: FaultFleet) -> list[str]:
    """Log lines of tasks that raised (a killed pool process's WorkerLostError excepted)."""
    out = []
    for w in fleet.workers:
        text = w.log.read_text(errors="replace") if w.log.exists() else ""
        for line in text.splitlines():
            if "raised unexpected" in line or (
                "Task handler raised error" in line and "WorkerLostError" not in line
            ):
                out.append(f"{w.name}: {line.strip()[:300]}")
    return out


def check_chain_results(fleet: FaultFleet, ids: list[str]) -> None:
    """Each fault-chain flow returned the committed results of its steps, in order.

    A replay returns stored values, so whatever ran twice, the outcome is the one record.
    """
    results = dict(fleet.query("SELECT id, result FROM crux_flows WHERE id = ANY(%s)", [ids]))
    steps: dict[str, list[str]] = defaultdict(list)
    for flow_id, result in fleet.query(
        "SELECT flow_id, result FROM crux_steps WHERE flow_id = ANY(%s) AND kind = 'step' "
        "ORDER BY flow_id, seq",
        [ids],
    ):
        steps[flow_id].append(json.loads(result))
    wrong = []
    for flow_id in ids:
        got = json.loads(results[flow_id])
        if got != {"tokens": steps[flow_id], "go": {"flow": flow_id}}:
            wrong.append(f"{flow_id}: {got} vs steps {steps[flow_id]}")
    assert wrong == [], wrong[:5]
