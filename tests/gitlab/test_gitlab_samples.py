"""The copied GitLab webhook samples stay complete and parseable (intake tests rely on them)."""

from __future__ import annotations

import json
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "gitlab"


def test_index_lists_every_sample_and_each_parses() -> None:
    index = json.loads((SAMPLES / "index.json").read_text())
    listed = {entry["file"] for entry in index}
    on_disk = {p.name for p in SAMPLES.glob("*.json")} - {"index.json"}
    assert listed == on_disk
    for entry in index:
        payload = json.loads((SAMPLES / entry["file"]).read_text())
        assert entry["x_gitlab_event_header"].endswith("Hook")
        assert isinstance(payload, dict) and payload.get("object_kind")


def test_note_hook_2_keeps_its_malformed_timestamp() -> None:
    payload = json.loads((SAMPLES / "note_hook__2.json").read_text())
    assert payload["merge_request"]["last_commit"]["timestamp"] == "2015-04-08T21: 00:25-07:00"
