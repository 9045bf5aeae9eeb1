"""The deployment kit in ``deploy/``, checked without Docker or systemd running.

A Dockerfile lint that stands in for hadolint; the Dockerfile's build and install steps must
match the ones ``tests/test_wheel.py`` runs. The compose file is parsed (with PyYAML when it is
installed, otherwise with a small text parse), and the systemd unit is checked key by key and
with ``systemd-analyze verify`` where that is available.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
UNIT = DEPLOY / "systemd" / "payroll-gateway@.service"
STORE_URL = "postgresql://payroll@db:5432/payroll"


# -- a Dockerfile, as instructions ----------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int
    op: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buffer:
            start = number
        buffer += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            op, _, args = buffer.strip().partition(" ")
            out.append(Instruction(start, op.upper(), args.strip()))
            buffer = ""
    return out


def _run_commands(instructions: list[Instruction]) -> list[list[str]]:
    """Every shell command of every RUN, split at ``&&`` and ``;``, as argument lists."""
    commands = []
    for ins in instructions:
        if ins.op != "RUN":
            continue
        for part in re.split(r"&&|;", ins.args):
            if part.strip():
                commands.append(shlex.split(part))
    return commands


def _pip_commands(instructions: list[Instruction], verb: str) -> list[list[str]]:
    found = []
    for argv in _run_commands(instructions):
        if "pip" in argv:
            rest = argv[argv.index("pip") + 1 :]
            if rest and rest[0] == verb:
                found.append(rest)
    return found


# -- the lint: each rule returns its problems ------------------------------------------------------


def _from_images(instructions: list[Instruction]) -> list[str]:
    args = {}
    for ins in instructions:
        if ins.op == "ARG" and "=" in ins.args:
            key, _, value = ins.args.partition("=")
            args[key.strip()] = value.strip()
    images = []
    for ins in instructions:
        if ins.op == "FROM":
            image = ins.args.split()[0]
            images.append(
                re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)
            )
    return images


def rule_pinned_base(ins: list[Instruction]) -> list[str]:
    stages = {i.args.split()[-1] for i in ins if i.op == "FROM" and " AS " in i.args.upper()}
    return [
        f"FROM {image}: pin a tag, never latest or none"
        for image in _from_images(ins)
        if image not in stages and (":" not in image or image.endswith(":latest"))
    ]


def rule_non_root_user(ins: list[Instruction]) -> list[str]:
    last_from = max((n for n, i in enumerate(ins) if i.op == "FROM"), default=-1)
    users = [(n, i.args) for n, i in enumerate(ins) if i.op == "USER" and n > last_from]
    cmd = max((n for n, i in enumerate(ins) if i.op in ("CMD", "ENTRYPOINT")), default=len(ins))
    if not users or users[-1][0] > cmd:
        return ["USER: the final stage must switch to a non-root user before CMD/ENTRYPOINT"]
    name = users[-1][1].split(":")[0]
    return ["USER: root"] if name in ("root", "0") else []


def rule_pip_no_cache(ins: list[Instruction]) -> list[str]:
    return [
        f"pip {' '.join(argv)}: add --no-cache-dir"
        for verb in ("install", "wheel")
        for argv in _pip_commands(ins, verb)
        if "--no-cache-dir" not in argv
    ]


def rule_healthcheck(ins: list[Instruction]) -> list[str]:
    checks = [i for i in ins if i.op == "HEALTHCHECK"]
    if not checks or "NONE" in checks[-1].args.upper().split():
        return ["HEALTHCHECK: missing"]
    return [] if "/healthz" in checks[-1].args else ["HEALTHCHECK: must poll /healthz"]


def rule_json_exec_form(ins: list[Instruction]) -> list[str]:
    problems = []
    for i in ins:
        if i.op in ("CMD", "ENTRYPOINT"):
            try:
                ok = isinstance(json.loads(i.args), list)
            except ValueError:
                ok = False
            if not ok:
                problems.append(f"{i.op} on line {i.line}: use the JSON (exec) form")
        form = re.search(r"(?:^|\s)CMD\s+(.*)", i.args) if i.op == "HEALTHCHECK" else None
        if form is not None:
            if not form.group(1).startswith("["):
                problems.append(f"HEALTHCHECK on line {i.line}: use the JSON (exec) form")
    return problems


def rule_no_remote_add(ins: list[Instruction]) -> list[str]:
    return [f"ADD on line {i.line}: use COPY (and curl/pip for URLs)" for i in ins if i.op == "ADD"]


def rule_apt_get(ins: list[Instruction]) -> list[str]:
    problems = []
    for i in ins:
        if i.op != "RUN" or "apt-get" not in i.args:
            continue
        if (
            re.search(r"apt-get\s+(-\S+\s+)*install", i.args)
            and "--no-install-recommends" not in i.args
        ):
            problems.append(
                f"RUN on line {i.line}: apt-get install without --no-install-recommends"
            )
        if "install" in i.args and "rm -rf /var/lib/apt/lists" not in i.args:
            problems.append(f"RUN on line {i.line}: clean /var/lib/apt/lists in the same RUN")
        if "upgrade" in i.args.split():
            problems.append(
                f"RUN on line {i.line}: no apt-get upgrade (pin the base image instead)"
            )
    return problems


def rule_no_sudo_or_cd(ins: list[Instruction]) -> list[str]:
    return [
        f"RUN on line {i.line}: use WORKDIR, not cd; never sudo"
        for i in ins
        if i.op == "RUN" and any(argv and argv[0] in ("cd", "sudo") for argv in _run_commands([i]))
    ]


RULES: list[Callable[[list[Instruction]], list[str]]] = [
    rule_pinned_base,
    rule_non_root_user,
    rule_pip_no_cache,
    rule_healthcheck,
    rule_json_exec_form,
    rule_no_remote_add,
    rule_apt_get,
    rule_no_sudo_or_cd,
]


def lint(text: str) -> list[str]:
    instructions = parse_dockerfile(text)
    return [problem for rule in RULES for problem in rule(instructions)]


def test_the_dockerfile_passes_the_lint() -> None:
    assert lint(DOCKERFILE.read_text(encoding="utf-8")) == []


GOOD = """FROM python:3.11-slim AS build
RUN pip wheel --no-cache-dir --no-deps -w /dist /src
FROM python:3.11-slim
RUN pip install --no-cache-dir -c /tmp/requirements.lock /dist/x.whl
USER app
HEALTHCHECK CMD ["python", "-c", "print('/healthz')"]
CMD ["serve"]
"""


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        ("FROM python:3.11-slim\n", "FROM python:latest\n", "pin a tag"),
        ("FROM python:3.11-slim\n", "FROM python\n", "pin a tag"),
        ("USER app\n", "", "non-root user"),
        ("USER app\n", "USER root\n", "USER: root"),
        (
            'USER app\nHEALTHCHECK CMD ["python", "-c", "print(\'/healthz\')"]\nCMD ["serve"]\n',
            'HEALTHCHECK CMD ["python", "-c", "print(\'/healthz\')"]\nCMD ["serve"]\nUSER app\n',
            "before CMD",
        ),
        ("install --no-cache-dir", "install", "add --no-cache-dir"),
        ('HEALTHCHECK CMD ["python", "-c", "print(\'/healthz\')"]\n', "", "HEALTHCHECK: missing"),
        ('CMD ["serve"]', "CMD serve", "JSON (exec) form"),
        ("USER app\n", "ADD https://example.org/x.tgz /x\nUSER app\n", "use COPY"),
        (
            "USER app\n",
            "RUN apt-get update && apt-get install -y curl\nUSER app\n",
            "--no-install-recommends",
        ),
        (
            "USER app\n",
            "RUN apt-get update && apt-get install -y --no-install-recommends curl\nUSER app\n",
            "/var/lib/apt/lists",
        ),
        ("USER app\n", "RUN cd /src && make\nUSER app\n", "WORKDIR"),
    ],
)
def test_the_lint_catches(old: str, new: str, words: str) -> None:
    assert lint(GOOD) == []
    bad = GOOD.replace(old, new, 1)
    assert bad != GOOD
    assert any(words in problem for problem in lint(bad)), lint(bad)


# -- the image is built and installed the way the wheel test does it -------------------------------


def _wheel_test_steps() -> tuple[list[str], list[str]]:
    """The pip arguments tests/test_wheel.py uses to build and to install the wheel."""
    tree = ast.parse((REPO / "tests" / "test_wheel.py").read_text(encoding="utf-8"))
    calls = [
        [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_pip"
    ]
    build = next(c for c in calls if c[:1] == ["wheel"])
    install = next(c for c in calls if "install" in c)
    return build, install[install.index("install") :]


def test_the_dockerfile_builds_and_installs_like_the_wheel_test() -> None:
    build, install = _wheel_test_steps()
    assert build[:2] == ["wheel", "--no-deps"] and install[:2] == ["install", "-c"]
    instructions = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    [docker_build] = _pip_commands(instructions, "wheel")
    [docker_install] = _pip_commands(instructions, "install")
    assert "--no-deps" in docker_build
    # the constraints are the lock, and the only thing installed is the wheel built above
    lock = docker_install[docker_install.index("-c") + 1]
    assert Path(lock).name == "requirements.lock"
    targets = [a for a in docker_install[1:] if not a.startswith("-") and a != lock]
    assert len(targets) == 1 and targets[0].endswith(".whl") and "payroll_gateway-" in targets[0]
    copied = [i.args for i in instructions if i.op == "COPY"]
    assert "requirements.lock /tmp/requirements.lock" in copied and Path(lock) == Path(
        "/tmp/requirements.lock"
    )


def test_the_dockerignore_keeps_out_what_the_wheel_test_keeps_out() -> None:
    source = (REPO / "tests" / "test_wheel.py").read_text(encoding="utf-8")
    block = re.search(r"NOT_SOURCE = \(([^)]*)\)", source)
    assert block is not None
    not_source = {json.loads(a) for a in re.findall(r'"[^"]*"', block.group(1))}
    ignored = {
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not_source - ignored <= {"__pycache__"} and "**/__pycache__" in ignored


def test_the_runtime_reads_the_mounted_config_and_keeps_data_in_a_volume() -> None:
    instructions = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    assert _from_images(instructions)[-1] == "python:3.11-slim"
    [cmd] = [json.loads(i.args) for i in instructions if i.op == "CMD"]
    assert cmd[cmd.index("--config") + 1] == "/etc/payroll-gateway/gateway.toml"
    assert "/var/lib/payroll-gateway" in next(i.args for i in instructions if i.op == "VOLUME")


# -- compose ---------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    text = COMPOSE.read_text(encoding="utf-8")
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        return _compose_by_text(text)
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def _compose_by_text(text: str) -> dict[str, Any]:
    """The subset this file uses: services by two-space indent, their flow-sequence commands,
    ``image``, and the names under ``depends_on``."""
    services: dict[str, dict[str, Any]] = {}
    top, current, sub = "", None, ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        key, _, value = line.strip().partition(":")
        if indent == 0:
            top, current = key, None
        elif top == "services" and indent == 2:
            current = services.setdefault(key, {})
        elif current is not None and indent == 4:
            sub = key
            if value.strip():
                current[key] = json.loads(value) if value.strip().startswith("[") else value.strip()
        elif current is not None and indent == 6 and sub == "depends_on":
            current.setdefault("depends_on", {})[key] = {}
        if (
            top != "services"
            and indent == 0
            and key not in ("name", "x-gateway", "secrets", "volumes")
        ):
            raise AssertionError(f"unexpected top-level key {key!r}")
    return {"services": services}


def test_compose_runs_intake_and_dispatch_on_postgresql() -> None:
    services = _compose()["services"]
    assert {"db", "migrate", "intake", "dispatch"} <= set(services)
    roles = {}
    for name in ("intake", "dispatch"):
        command = services[name]["command"]
        assert command[0] == "serve" and command[command.index("--store") + 1] == STORE_URL
        roles[name] = command[command.index("--role") + 1]
    assert roles == {"intake": "intake", "dispatch": "dispatch"}
    migrate = services["migrate"]["command"]
    assert migrate[0] == "migrate" and migrate[migrate.index("--store") + 1] == STORE_URL
    assert "db" in services["migrate"]["depends_on"]
    assert services["db"]["image"].startswith("postgres:") and not services["db"]["image"].endswith(
        ":latest"
    )


# -- systemd ---------------------------------------------------------------------------------------


def _unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, line
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_the_unit_is_hardened_and_runs_its_instance_role() -> None:
    unit = _unit(UNIT.read_text(encoding="utf-8"))
    service = unit["Service"]
    exec_start = shlex.split(service["ExecStart"][0])
    assert exec_start[1] == "serve" and exec_start[exec_start.index("--role") + 1] == "%i"
    assert exec_start[exec_start.index("--config") + 1] == "/etc/payroll-gateway/gateway.toml"
    assert service.get("DynamicUser") == ["yes"] or service.get("User", [""])[0] not in ("", "root")
    assert service["ProtectSystem"] == ["strict"] and service["NoNewPrivileges"] == ["yes"]
    assert "/var/lib/payroll-gateway" in service["ReadWritePaths"][0].split()
    assert service["Restart"][0] in ("on-failure", "always") and service["KillSignal"] == [
        "SIGTERM"
    ]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here"
)
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    # an instance of the template, with an executable that exists on this machine
    executable = Path(sys.executable).with_name("payroll-gateway")
    text = UNIT.read_text(encoding="utf-8").replace(
        "/opt/payroll-gateway/bin/payroll-gateway",
        str(executable if executable.exists() else sys.executable),
    )
    instance = tmp_path / "payroll-gateway@intake.service"
    instance.write_text(text, encoding="utf-8")
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(instance)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    problems = [
        line for line in (done.stdout + done.stderr).splitlines() if "payroll-gateway" in line
    ]
    assert done.returncode == 0 and problems == [], done.stdout + done.stderr
