"""Another service's Celery app: it knows nothing of crux_workers (no database, no flows).

Its worker consumes the "children" queue; flows reach its tasks with run_task by name.
"""

from __future__ import annotations

import os
import time

from celery import Celery

app = Celery("children", broker=os.environ["CRUX_REDIS_URL"], set_as_current=False)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_default_queue="children",
    broker_transport_options={"visibility_timeout": 6},
)


def _effect(flow_id: str, name: str) -> None:
    line = f"{flow_id} {name} {os.getpid()}\n".encode()
    fd = os.open(os.environ["CRUXTEST_EFFECTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@app.task(name="children.plan", bind=True)  # type: ignore[untyped-decorator]
def plan(self: object, topic: str, fail_times: int = 0, delay: float = 0.0) -> list[str]:
    # The task id is crux:<flow>:<seq>:<attempt>:<secret>: fail the first fail_times attempts.
    _, flow_id, _seq, attempt, _secret = self.request.id.rsplit(":", 4)  # type: ignore[attr-defined]
    _effect(flow_id, f"child-plan-{attempt}")
    time.sleep(delay)
    if int(attempt) <= fail_times:
        raise RuntimeError(f"planner unavailable (attempt {attempt})")
    return [f"intro to {topic}", f"{topic} in depth"]
