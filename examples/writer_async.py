"""The seed's writer flow, async: plan on another worker, wait for approval, write.

The same flow as ``examples/writer.py`` written with ``async def``: every checkpoint is
awaited, and the writing step drafts its sections concurrently (``asyncio.gather``) on
the worker's flow loop, as an async model client would. Run it beside the planning
service of the sync example (it reaches ``writer.plan_draft`` by name)::

    crux-workers worker --import examples.writer_async
    celery -A examples.writer:tasks worker -Q writer-tasks

``start_article`` checks the caller's access before anything is recorded; ``approve``
signals an editor's decision.
"""

from __future__ import annotations

import asyncio
from typing import Any

from celery import signature
from pydantic import BaseModel

from crux_workers import Retry, current_step, flow, signal_flow

QUEUE = "writer-tasks"


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


async def write_section(title: str, notes: str) -> str:
    """Stand-in for an async model call: it awaits, and the flow loop serves others."""
    await asyncio.sleep(0.05)
    return f"## {title}\n... ({notes or 'no notes'})"


async def write_article(plan: dict[str, Any], notes: str) -> dict[str, Any]:
    """Draft every section at once; a cancel of the flow stops them at their await."""
    sections = await asyncio.gather(*(write_section(s, notes) for s in plan["sections"]))
    return {
        "title": plan["title"],
        "body": "\n\n".join(sections),
        "editor_notes": notes,
        "key": current_step().idempotency_key,
    }


@flow("writer-async", input=Article)
async def writer(f: Any) -> dict[str, Any]:
    """Plan on the planning service, wait for an editor, write if approved."""
    a = f.input
    plan = await f.run_task(
        "plan draft",
        signature("writer.plan_draft", args=(a.topic, a.audience), queue=QUEUE),
        retry=Retry(attempts=3, backoff="exponential"),
    )
    decision = await f.suspend("approval", schema=Decision, timeout=a.review_within)
    if not decision.approved:
        return {"status": "rejected", "editor": decision.editor, "notes": decision.notes}
    draft = await f.step("write", lambda: write_article(plan, decision.notes))
    return {"status": "written", "editor": decision.editor, "draft": draft}


# -- the app's public surface ---------------------------------------------------------

# Who may write for which publication; a real app asks its own user store.
WRITERS: dict[str, set[str]] = {"crux-weekly": {"ada", "henri"}}


class NotAllowed(PermissionError):
    """The caller may not start this flow."""


def start_article(caller: str, request: dict[str, Any]) -> str:
    """Check the caller's access first, then start the flow; returns its id."""
    article = Article.model_validate({**request, "author": caller})
    if caller not in WRITERS.get(article.publication, set()):
        raise NotAllowed(f"{caller!r} may not write for {article.publication!r}")
    return writer.run(input=article).flow_id


def approve(flow_id: str, editor: str, *, approved: bool = True, notes: str = "") -> int:
    """An editor's decision, recorded durably; it resumes the flow. Returns the signal id."""
    payload = Decision(approved=approved, editor=editor, notes=notes).model_dump()
    return signal_flow(flow_id, "approval", payload, key=f"approval-by-{editor}").signal_id
