"""Promoted versions and the `champion` pointer, in a store (instructflow.serving.storage).

    <store>/versions/v3/policy/...   the policy (a save_pretrained folder), files.json last
    <store>/versions/v3/rm/...       the RM's ONNX export (its own manifest.json), files.json last
    <store>/versions/v3/version.json what v3 is: its round, the gate's figures, the version before it
    <store>/champion.json            the pointer: a copy of the current version's record

Publishing writes a version's folders, then its version.json, and moves the pointer
LAST, so a reader that follows the pointer never finds half a version. Versions are
never overwritten or deleted; a rollback only moves the pointer (to the version before
the current one, or to one named).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..serving.storage import fetch_folder, open_store, publish_folder

POINTER = "champion.json"
VERSIONS = "versions"


def read_pointer(store) -> dict | None:
    raw = store.read(POINTER)
    return json.loads(raw) if raw is not None else None


def read_version(store, version: str) -> dict:
    raw = store.read(f"{VERSIONS}/{version}/version.json")
    if raw is None:
        raise ValueError(f"{store.uri}: no version {version!r} (versions: {', '.join(list_versions(store)) or 'none'})")
    return json.loads(raw)


def list_versions(store) -> list[str]:
    """The complete versions (their version.json written), oldest first."""
    found = {m.group(1) for n in store.names(VERSIONS + "/") if (m := re.fullmatch(rf"{VERSIONS}/(v\d+)/version\.json", n))}
    return sorted(found, key=lambda v: int(v[1:]))


def _next_version(store) -> str:
    """One past every version ever started (a half-published one's number is not reused)."""
    numbers = [int(m.group(1)) for n in store.names(VERSIONS + "/") if (m := re.match(rf"{VERSIONS}/v(\d+)/", n))]
    return f"v{max(numbers, default=0) + 1}"


def _move_pointer(store, record: dict, **why) -> dict:
    pointer = {**record, **why, "pointer_moved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.write(POINTER, json.dumps(pointer, indent=1).encode())
    return pointer


def promote(store_uri: str, policy_dir: Path, rm_export_dir: Path, facts: dict) -> dict:
    """Publish the policy and the RM export as a new version, then point `champion` at it; return the pointer."""
    from ..serving.onnx import verify_export

    store = open_store(store_uri)
    rm_manifest = verify_export(rm_export_dir)  # nothing unverified is published
    version = _next_version(store)
    current = read_pointer(store)
    publish_folder(store, policy_dir, f"{VERSIONS}/{version}/policy")
    publish_folder(store, rm_export_dir, f"{VERSIONS}/{version}/rm")
    record = {"version": version, "policy": f"{VERSIONS}/{version}/policy", "rm": f"{VERSIONS}/{version}/rm",
              "rm_model_version": rm_manifest["model_version"], "previous": current["version"] if current else None,
              "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **facts}
    store.write(f"{VERSIONS}/{version}/version.json", json.dumps(record, indent=1).encode())
    return _move_pointer(store, record, reason="promoted")


def rollback(store_uri: str, to: str | None = None) -> dict:
    """Point `champion` back at the version before the current one (or at `to`); return the new pointer."""
    store = open_store(store_uri)
    current = read_pointer(store)
    if current is None:
        raise ValueError(f"{store.uri}: no champion to roll back (nothing was promoted)")
    target = to or current.get("previous")
    if not target:
        raise ValueError(f"{store.uri}: the champion {current['version']} is the first version; there is none before it "
                         "(the pipeline's SFT model serves no RM)")
    if target == current["version"]:
        raise ValueError(f"{store.uri}: {target} is already the champion")
    return _move_pointer(store, read_version(store, target), reason=f"rolled back from {current['version']}")


def fetch_version(store_uri: str, version: str, dest: Path, part: str) -> Path:
    """Download one part ("policy" or "rm") of a version into `dest`, verified."""
    store = open_store(store_uri)
    record = read_version(store, version)
    return fetch_folder(store, record[part], dest)
