"""The container files, checked without pulling a base image: hadolint on the Dockerfile, Docker
Compose v2's own ``config`` on docker-compose.yml with the kits of a real ``fedfm provision``, and
every command, flag and mounted file the services use."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed (the dev extra installs it)")
    return str(path)


def test_the_dockerfile_passes_hadolint_and_installs_what_its_entrypoint_runs():
    done = subprocess.run([_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["fedfm"]' in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["fedfm"] == "fedfm.cli:main"
    extras = re.search(r"ARG EXTRAS=(\S+)", text).group(1).split(",")
    assert set(extras) <= set(project["optional-dependencies"])
    for source in re.findall(r"^COPY (.+) \./?\S*$", text, flags=re.M):
        assert all((ROOT / s).exists() for s in source.split()), source


def _options(command: str) -> set[str]:
    import typer

    from fedfm.cli import app

    click = typer.main.get_command(app).commands[command]
    return {opt for p in click.params for opt in getattr(p, "opts", [])}


def test_compose_config_validates_with_real_kits_and_every_flag_and_file_exists(tmp_path):
    from fedfm.config import load_config
    from fedfm.deploy.server import check_deployable

    kits = tmp_path / "fed"
    done = subprocess.run(
        [sys.executable, "-m", "fedfm.cli", "provision", str(kits), "--server-name", "server",
         "--site", "a", "--site", "b", "--site", "c"], capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "FEDFM_KITS": str(kits)}
    compose = [_tool("docker-compose"), "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"]
    done = subprocess.run(compose, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert set(services) == {"server", "client-a", "client-b", "client-c"}
    for name, service in services.items():
        command = service["command"]
        flags = {a for a in command if a.startswith("--")}
        assert flags <= _options(command[0]), (name, flags - _options(command[0]))
        mounts = {v["target"]: Path(v["source"]) for v in service.get("volumes", []) if v["type"] == "bind"}
        for arg in command:
            for target, source in mounts.items():
                if arg.startswith(target + "/"):
                    assert (source / arg[len(target) + 1 :]).is_file(), (name, arg, source)
    assert services["client-a"]["depends_on"]["server"]
    cfg = load_config(ROOT / "deploy" / "compose.toml")
    assert cfg.partition.num_clients == 3 == len((kits / "server" / "tokens.txt").read_text().splitlines())
    assert check_deployable(cfg) == []  # the deployment bounds are set: no warning
