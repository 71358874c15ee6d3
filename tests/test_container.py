"""The Dockerfile, read as the image builder reads it (no container engine is needed)."""

from __future__ import annotations

import re

from tests.conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in lines if line and not line.startswith("#")]  # fmt: skip


def test_every_base_image_is_pinned_by_digest() -> None:
    """Each FROM names its image by sha256 digest, directly or through an ARG default."""
    args = dict(a.split("=", 1) for k, a in instructions() if k == "ARG" and "=" in a)
    froms = [a.split()[0] for k, a in instructions() if k == "FROM"]
    assert len(froms) == 2
    for image in froms:
        resolved = args.get(image.strip("${}"), image)
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", resolved), resolved


def test_the_final_image_carries_no_wheels_and_runs_as_a_user_owning_its_volume() -> None:
    """Only the built virtual environment is copied from the build stage; /data is a volume
    created for uid 10001, which the image runs as."""
    final = instructions()[[k for k, _ in instructions()].index("FROM", 2) :]
    copies = [a for k, a in final if k == "COPY"]
    assert copies == ["--from=build /opt/invite-worker /opt/invite-worker"]
    assert not any("wheel" in a for _, a in final)
    run = " ".join(a for k, a in final if k == "RUN")
    assert "--uid 10001" in run
    assert "install -d -o 10001 -g 10001 -m 0700 /data" in run
    assert ("VOLUME", '["/data"]') in final
    assert ("USER", "10001:10001") in final
    assert ("ENTRYPOINT", '["invite-worker"]') in final
