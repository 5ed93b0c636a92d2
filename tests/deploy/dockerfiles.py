"""Readers of the Dockerfiles (``dockerfile-parse``), the Makefile's torch pin and ``.dockerignore``."""

from __future__ import annotations

import re

from .common import ROOT

DOCKERFILES = {
    "reward": ROOT / "docker" / "reward.Dockerfile",
    "reward-cpu": ROOT / "docker" / "reward-cpu.Dockerfile",
    "trainer": ROOT / "docker" / "trainer.Dockerfile",
}


def dockerfile(name: str) -> list[dict]:
    from dockerfile_parse import DockerfileParser

    return [i for i in DockerfileParser(path=str(DOCKERFILES[name])).structure if i["instruction"] != "COMMENT"]


def instructions(name: str, kind: str) -> list[str]:
    return [i["value"] for i in dockerfile(name) if i["instruction"] == kind]


def makefile_torch_pin() -> str:
    m = re.search(r"^TORCH\s*\??=\s*(.+?)\s*$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "the Makefile has no TORCH pin"
    return m.group(1)


def dockerignored(path: str) -> bool:
    """Does .dockerignore exclude ``path`` (relative to the context)? Docker's rules for the patterns used here."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        rx = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rx = rx.replace(r"\?", "[^/]").replace(r"\[cod\]", "[cod]")
        parts = path.strip("/").split("/")
        if any(re.fullmatch(rx, "/".join(parts[: i + 1])) for i in range(len(parts))):
            excluded = not negate
    return excluded
