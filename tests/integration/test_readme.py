"""The README's first command, run as written in a clean copy of the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.workers import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_the_readme_opens_with_the_demo_and_the_test_command() -> None:
    first, second = readme_commands()[:2]
    assert "crux-workers demo" in first
    assert second.strip() == "bash scripts/test.sh"
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_the_readme_demo_command_runs_on_the_embedded_default(tmp_path: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    clone = tmp_path / "clone"
    for name in files:
        src = REPO / name
        if src.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / name)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home())}
    done = subprocess.run(
        ["bash", "-c", readme_commands()[0]],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    order = [
        "started",
        "step 'send-welcome' committed",
        "suspended, waiting for 'email-verified'",
        "signal 'email-verified' recorded",
        "resumed at checkpoint 1",
        "step 'first-week-plan' committed",
        "step 'schedule-checkins' committed",
        "outcome: completed",
    ]
    positions = [out.find(marker) for marker in order]
    assert -1 not in positions, out
    assert positions == sorted(positions), out
    assert not (clone / ".crux").exists()  # the demo keeps its record in a temp dir
