"""Read the deployment files as Docker, Compose and Kubernetes would, and run their commands.

There is no Docker engine on the test machines, so the compose services are run as plain
processes: each service's command and environment are taken as written, Compose's
``${VAR:-default}`` interpolation is applied, and only two things are translated:

- hostnames of the compose services (``postgres``, ``redis-broker``...) become the
  loopback URLs of the test's own servers (a Redis URL keeps its user and password:
  the test's redis-servers run with the compose file's ACL users);
- files under ``/tmp`` (the worker's heartbeat) move into the test's own directory;
- the image's entrypoint (``tini -- crux-workers``) becomes this checkout's
  ``.venv/bin/crux-workers``: tini only forwards signals and reaps orphans, and the image's
  ``WORKDIR /app`` (examples/ on ``PYTHONPATH``) becomes the repository root.

The venv holds more than the image would (pytest, ruff, PyYAML...): ``import_guard``
makes those unimportable in the service processes, so a dependency that pyproject.toml
forgets fails here as it would in the image, instead of being found by luck.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DEPLOY_DIR = REPO / "deploy"
LOOPBACK = "127.0.0.1"


# -- YAML ---------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    """docker-compose.yml as a mapping (YAML anchors and ``<<`` merges resolved)."""
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


def load_manifests() -> dict[Path, list[dict[str, Any]]]:
    """Every YAML document under deploy/, by file (empty documents dropped)."""
    out: dict[Path, list[dict[str, Any]]] = {}
    for path in sorted(DEPLOY_DIR.rglob("*.yaml")) + sorted(DEPLOY_DIR.rglob("*.yml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        out[path] = docs
    return out


# -- Compose interpolation --------------------------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    """A ``${VAR:?message}`` whose variable is unset, as Compose would refuse it."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Apply Compose's variable substitution to ``text`` with ``env`` as the shell.

    Supports ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?err}``, ``${VAR?err}``, ``${VAR:+alt}``, ``${VAR+alt}`` and ``$$``.
    An unset variable without a default becomes the empty string, as in Compose.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("named")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        if op is None:
            assert not arg, f"unsupported interpolation {match.group(0)!r}"
            return value or ""
        unset = value is None or (op.startswith(":") and value == "")
        kind = op[-1]
        if kind == "-":
            return interpolate(arg, env) if unset else str(value)
        if kind == "?":
            if unset:
                raise InterpolationError(f"{name}: {arg}")
            return str(value)
        return "" if unset else interpolate(arg, env)  # "+": the alternative when set

    return _VAR.sub(replace, text)


def interpolate_all(value: Any, env: Mapping[str, str]) -> Any:
    """``interpolate`` applied to every string value of a YAML structure."""
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [interpolate_all(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate_all(v, env) for k, v in value.items()}
    return value


def parse_duration(text: str) -> float:
    """A Compose duration (``1m30s``, ``10s``, ``2m``) in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# -- Dockerfile ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction with its (continuation-joined) arguments."""

    keyword: str
    args: str
    stage: int


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions in order, comments dropped, ``\\`` lines joined."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        out.append(Instruction(keyword, args.strip(), stage))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def final_stage() -> list[Instruction]:
    """Instructions of the last stage (the image that runs)."""
    instructions = dockerfile()
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD; the shell form is refused on purpose."""
    value = json.loads(instruction.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), instruction
    return value


def image_entrypoint() -> list[str]:
    """The runtime image's ENTRYPOINT."""
    entries = [i for i in final_stage() if i.keyword == "ENTRYPOINT"]
    assert entries, "the Dockerfile has no ENTRYPOINT"
    return exec_form(entries[-1])


def image_env() -> dict[str, str]:
    """The runtime image's ENV values (``KEY=value`` form)."""
    env: dict[str, str] = {}
    for ins in final_stage():
        if ins.keyword == "ENV":
            for token in ins.args.split():
                key, sep, value = token.partition("=")
                assert sep, f"ENV without '=': {ins.args!r}"
                env[key] = value.strip('"')
    return env


def image_workdir() -> str:
    """The runtime image's last WORKDIR."""
    dirs = [i.args for i in final_stage() if i.keyword == "WORKDIR"]
    assert dirs, "the Dockerfile sets no WORKDIR"
    return dirs[-1]


def copy_sources(instructions: Iterable[Instruction]) -> list[str]:
    """Sources of the COPY/ADD instructions that read the build context."""
    sources: list[str] = []
    for ins in instructions:
        if ins.keyword not in ("COPY", "ADD"):
            continue
        tokens = ins.args.split()
        flags = [t for t in tokens if t.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        paths = [t for t in tokens if not t.startswith("--")]
        sources += paths[:-1]
    return sources


# -- .dockerignore --------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out += "/?"  # "**/x" also matches "x" at the root
                i += 1
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignored(path: str) -> bool:
    """Whether ``path`` (relative to the repo) is left out of the build context.

    Docker's rules: the last matching pattern wins, ``!`` re-includes, and a pattern
    that matches a directory leaves out everything under it.
    """
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _pattern_regex(pattern)))
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            ignored = not negate
    return ignored


# -- compose services as local processes -------------------------------------------------


def service_environment(service: Mapping[str, Any], shell: Mapping[str, str]) -> dict[str, str]:
    """A service's ``environment`` after interpolation.

    An entry without a value is passed through from ``shell`` when set there and left
    out otherwise, as Compose does.
    """
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs: dict[str, Any] = {}
        for item in raw:
            key, sep, value = str(item).partition("=")
            pairs[key] = value if sep else None
        raw = pairs
    env: dict[str, str] = {}
    for key, value in raw.items():
        if value is None:
            if key in shell:
                env[key] = shell[key]
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        env[key] = interpolate(text, shell)
    return env


def as_list(command: Any) -> list[str]:
    """A compose ``command``/``entrypoint`` as an argv list (string form split like sh)."""
    import shlex

    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(c) for c in command]


def service_argv(service: Mapping[str, Any], shell: Mapping[str, str]) -> list[str]:
    """Entrypoint (the service's, else the image's) plus command, interpolated."""
    entrypoint = as_list(service.get("entrypoint")) or image_entrypoint()
    command = as_list(service.get("command"))
    return [interpolate(a, shell) for a in entrypoint + command]


def local_argv(argv: list[str]) -> list[str]:
    """The image's argv as this checkout runs it (see the module docstring)."""
    argv = list(argv)
    if argv[:2] == ["tini", "--"]:
        argv = argv[2:]
    bin_dir = Path(sys.executable).parent
    if argv and argv[0] == "crux-workers":
        argv[0] = str(bin_dir / "crux-workers")
    elif argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def healthcheck_argv(service: Mapping[str, Any]) -> list[str]:
    """A service's healthcheck ``test`` as an argv."""
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return ["sh", "-c", test]
    kind, *rest = test
    if kind == "CMD-SHELL":
        return ["sh", "-c", " ".join(rest)]
    assert kind == "CMD", f"unexpected healthcheck form {kind!r}"
    return [str(a) for a in rest]


def localise_urls(env: Mapping[str, str], urls: Mapping[str, str]) -> dict[str, str]:
    """Replace every URL whose host is a compose service by that service's loopback URL.

    A ``redis://`` URL keeps its user and password (the local redis-servers have the
    compose file's ACL users); other URLs are replaced whole (the test's Postgres).
    """
    out = dict(env)
    for key, value in env.items():
        if "://" not in value:
            continue
        parts = urlsplit(value)
        host = parts.hostname
        if host is None or host not in urls:
            continue
        local = urlsplit(urls[host])
        if parts.scheme.startswith("redis") and "@" in parts.netloc:
            userinfo = parts.netloc.rpartition("@")[0]
            out[key] = local._replace(netloc=f"{userinfo}@{local.netloc}").geturl()
        else:
            out[key] = urls[host]
    return out


def localise_paths(env: Mapping[str, str], directory: Path) -> dict[str, str]:
    """Move every value that is a path under ``/tmp`` into ``directory`` (one per run)."""
    return {
        k: str(directory / v.removeprefix("/tmp/")) if v.startswith("/tmp/") else v
        for k, v in env.items()
    }


def runtime_distributions() -> set[str]:
    """Distributions ``pip install .`` brings, as the image's build does: the closure of
    pyproject.toml's ``dependencies`` over the installed metadata (extras and markers
    honoured), by canonical name."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project.get("dependencies", [])]
    seen: dict[str, set[str]] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        extras = set(req.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue  # a platform-specific one that is not installed here
        for line in requires:
            sub = Requirement(line)
            if sub.marker is None or any(
                sub.marker.evaluate({"extra": e}) for e in ("", *seen[name])
            ):
                todo.append(sub)
    return set(seen)


_GUARD = """\
import sys

_BLOCKED = frozenset({blocked!r})


class _NotInTheImage:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(
                f"No module named {{name!r}} (installed in the test venv, but not a "
                "dependency of crux_workers: the image would not have it)",
                name=name,
            )
        return None


sys.meta_path.insert(0, _NotInTheImage())
"""


def import_guard(directory: Path) -> Path:
    """Write a ``sitecustomize`` into ``directory`` that refuses every module of an
    installed distribution outside ``runtime_distributions()``; put ``directory``
    first on PYTHONPATH to use it."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    allowed = runtime_distributions() | {"crux-workers"}
    blocked = sorted(
        module
        for module, dists in packages_distributions().items()
        if not {canonicalize_name(d) for d in dists} & allowed
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(_GUARD.format(blocked=blocked))
    return directory


def process_env(service_env: Mapping[str, str], guard: Path | None = None) -> dict[str, str]:
    """This machine's environment (less any CRUX_*), the image's ENV mapped to the repo,
    and the service's environment on top; ``guard`` (``import_guard``) first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRUX_")}
    workdir = image_workdir()
    for key, value in image_env().items():
        env[key] = value.replace(workdir, str(REPO)) if key == "PYTHONPATH" else value
    if guard is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(guard), env.get("PYTHONPATH")]))
    env.update(service_env)
    return env


class ServiceProcess:
    """One compose service run as a local process, in its own process group."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path):
        self.name = name
        self.argv = argv
        self.log = log_dir / f"{name}.log"
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name}: {' '.join(self.argv)} ---\n" + "\n".join(
            text.splitlines()[-lines:]
        )

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout}s\n{self.tail()}"
            ) from None

    def wait_log(self, marker: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.log.read_bytes():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode}\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {marker!r} after {timeout}s\n{self.tail()}")
            time.sleep(0.1)

    def assert_running(self) -> None:
        code = self.proc.poll()
        assert code is None, f"{self.name} exited with {code}\n{self.tail()}"

    def stop_signal(self, sig: int = signal.SIGTERM) -> None:
        """Signal the main process only, as Docker's ``stop`` does through tini."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def kill_group(self) -> None:
        """SIGKILL the whole process group (master and children); idempotent."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        self._log_file.close()


@contextlib.contextmanager
def running(processes: list[ServiceProcess]) -> Iterator[list[ServiceProcess]]:
    """Kill every process group in ``processes`` (as it is at exit) however the block ends."""
    try:
        yield processes
    finally:
        for p in reversed(processes):
            p.kill_group()
