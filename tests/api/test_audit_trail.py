"""The audit trail through the app: capped request fields, history kept, fail closed."""

from __future__ import annotations

import json
import time

from app.server.audit import audit_files, verify_chain


def test_huge_headers_are_cut_and_do_not_rotate_history_away(client_for, fixtures, tmp_path):
    path = tmp_path / "audit" / "tiles.jsonl"
    client = client_for(Images=[{"Name": "boxes", "Path": str(fixtures / "boxes.tiff")}],
                        Audit={"Enabled": True, "Path": str(path), "MaxBytes": 200_000,
                               "BackupCount": 2})
    huge = "image/webp," + "x" * (8 << 20)
    for _ in range(20):
        r = client.get("/storage/boxes_files/0/0_0.jpeg?" + "q" * 5000,
                       headers={"Accept": huge, "If-None-Match": '"' + "e" * 3000 + '"'})
        assert r.status_code == 200
    client.__exit__(None, None, None)
    lines = [json.loads(x) for f in audit_files(path) for x in f.read_text().splitlines()]
    assert len(lines) == 20 and audit_files(path) == [path]  # nothing rotated away
    for line in lines:
        assert len(line["requested"]["accept"]) == 256 and len(line["path"]) == 256
        assert line["truncated"] == ["path", "requested.accept", "requested.if_none_match"]
        assert line["subject"] == "anonymous" and line["auth"] == "none"
        assert line["client"] == "127.0.0.1"
    assert path.stat().st_size < 20 * 2000
    assert verify_chain([path]).broken is None


def test_fail_closed_answers_503_rather_than_serve_unrecorded(client_for, fixtures):
    client = client_for(Images=[{"Name": "boxes", "Path": str(fixtures / "boxes.tiff")}],
                        Audit={"Enabled": True, "Path": "/dev/full", "MaxBytes": 0,
                               "FailClosed": True})
    deadline = time.monotonic() + 5
    statuses = []
    while time.monotonic() < deadline:  # the first lines are queued; the write then fails
        r = client.get("/storage/boxes_files/0/0_0.jpeg")
        statuses.append(r.status_code)
        if r.status_code == 503:
            break
        time.sleep(0.02)
    assert statuses[-1] == 503 and set(statuses) <= {200, 503}
    assert r.json()["error"] == "audit_unavailable" and r.headers["retry-after"] == "1"
    # an admin action is refused before it acts
    assert client.delete("/api/tiles/cache").status_code == 503
