"""The seed's writer flow: plan a draft on another worker, wait for approval, write.

- ``plan draft`` is a Celery task run with ``run_task`` (the seed's ``runAction``): on a
  fleet it runs on whichever worker consumes the ``writer-tasks`` queue
  (``celery -A examples.writer:tasks worker -Q writer-tasks``); on the embedded default
  it runs on a local thread.
- ``approval`` suspends the flow, holding no worker, until an editor decides.
- ``start_article`` is the public entry point: it checks the caller may write for the
  publication *before* anything is recorded. ``approve`` signals the decision.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from pydantic import BaseModel

from crux_workers import FlowContext, Retry, default_app, flow, signal_flow

QUEUE = "writer-tasks"


def _broker() -> str | None:
    return default_app().settings.effective_broker_url


# The planning service: its own Celery app and queue (it needs no crux_workers at all).
tasks = Celery("writer_tasks", broker=_broker(), set_as_current=False)
tasks.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_default_queue=QUEUE,
)


@tasks.task(name="writer.plan_draft")  # type: ignore[untyped-decorator]
def plan_draft(topic: str, audience: str) -> dict[str, Any]:
    """Stand-in for a planner (a model call, a search): an outline for the article."""
    return {
        "title": f"{topic.capitalize()}, explained for {audience}",
        "sections": [f"Why {topic} matters", f"{topic} in practice", "What to do next"],
    }


class Article(BaseModel):
    """What to write, and for whom."""

    topic: str
    audience: str = "engineers"
    author: str
    publication: str
    review_within: str = "7d"


class Decision(BaseModel):
    """An editor's decision on the plan."""

    approved: bool
    editor: str
    notes: str = ""


def write_article(plan: dict[str, Any], notes: str) -> dict[str, Any]:
    """Stand-in for the writer: a draft that follows the approved plan."""
    body = "\n\n".join(f"## {s}\n..." for s in plan["sections"])
    return {"title": plan["title"], "body": body, "editor_notes": notes}


@flow("writer", input=Article)
def writer(f: FlowContext[Article]) -> dict[str, Any]:
    """Plan on the planning service, wait for an editor, write if approved."""
    a = f.input
    plan = f.run_task(
        "plan draft",
        plan_draft.s(a.topic, a.audience).set(queue=QUEUE),
        retry=Retry(attempts=3, backoff="exponential"),
    )
    decision = f.suspend("approval", schema=Decision, timeout=a.review_within)
    if not decision.approved:
        return {"status": "rejected", "editor": decision.editor, "notes": decision.notes}
    draft = f.step("write", lambda: write_article(plan, decision.notes))
    return {"status": "written", "editor": decision.editor, "draft": draft}


# -- the app's public surface ---------------------------------------------------------

# Who may write for which publication; a real app asks its own user store.
WRITERS: dict[str, set[str]] = {"crux-weekly": {"ada", "henri"}}


class NotAllowed(PermissionError):
    """The caller may not start this flow."""


def start_article(caller: str, request: dict[str, Any]) -> str:
    """Check the caller's access first, then start the flow; returns its id.

    Input is validated by the flow's own model before the check, so a malformed
    request and a forbidden one are both refused with nothing recorded.
    """
    article = writer.input_model.model_validate({**request, "author": caller})
    if caller not in WRITERS.get(article.publication, set()):
        raise NotAllowed(f"{caller!r} may not write for {article.publication!r}")
    return writer.run(input=article).flow_id


def approve(flow_id: str, editor: str, *, approved: bool = True, notes: str = "") -> int:
    """An editor's decision, recorded durably; it resumes the flow. Returns the signal id."""
    payload = Decision(approved=approved, editor=editor, notes=notes).model_dump()
    return signal_flow(flow_id, "approval", payload, key=f"approval-by-{editor}").signal_id
