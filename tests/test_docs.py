"""Every ``python run.py ...`` command in README.md and docs/ composes (what ``--cfg job`` checks), and the docs link
only files the project ships."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from ap.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "experiments" / "README.md"]


def documented_commands() -> list[tuple[str, str]]:
    """(file name, command) for every ``python run.py`` command in a code block or in inline code."""
    found = []
    for path in DOCS:
        text = path.read_text()
        blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if line.startswith("python run.py"):
                    found.append((path.name, line.split(" #")[0].strip()))
        for inline in re.findall(r"`(python run\.py[^`]*)`", re.sub(r"```.*?```", "", text, flags=re.S)):
            found.append((path.name, inline.strip()))
    return sorted(set(found))


def overrides_of(command: str) -> list[str]:
    """The overrides of one point of the command: ``-m``, ``--cfg ...`` and ``-p ...`` dropped, each swept value list
    (``pruning=ap50,ap90``) cut to its first value."""
    args, out, skip = shlex.split(command)[2:], [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("--cfg", "-c", "-p", "--package"):
            skip = True
            continue
        if arg.startswith("-"):
            continue
        key, _, value = arg.partition("=")
        if "," in value and not value.startswith("["):
            value = value.split(",")[0]
        out.append(f"{key}={value}")
    return out


COMMANDS = documented_commands()


def test_the_docs_document_commands():
    assert len(COMMANDS) >= 40 and any(name == "README.md" for name, _ in COMMANDS)


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{n}:{c[14:60]}" for n, c in COMMANDS])
def test_documented_command_composes(where, command):
    assert "<" not in command and ">" not in command, f"{where}: a placeholder does not paste: {command}"
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides_of(command), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        job = {k: v for k, v in cfg.items() if k != "hydra"}
        OmegaConf.to_container(OmegaConf.create(job), resolve=True)  # every interpolation resolves
    finally:
        HydraConfig.instance().cfg = None


def test_docs_link_only_files_that_exist():
    missing = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if not re.match(r"[a-z]+://", target) and not (path.parent / target).exists():
                missing.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not missing, missing
