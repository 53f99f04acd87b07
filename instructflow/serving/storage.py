"""Object storage (S3 API) for what DVC does not do: publishing an exported RM
and fetching it with checksum verification.

Publishing removes the manifest, uploads every file, and writes the manifest
LAST, so a reader that finds a manifest finds a complete model (and one that
comes while a version is replaced finds none, not a mix). Each request is
retried through a storage outage (`faults.retrying`). Fetching downloads the manifest, then
each file it lists, checks every sha256, and only then moves the folder into
place. Endpoint and credentials come from the standard AWS settings
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION...).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..io import swap_in
from .onnx import MANIFEST, verify_export


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, prefix.strip("/")


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


def publish_export(folder: Path, uri: str, client=None, attempts: int = 6) -> dict:
    """Upload a verified export folder to s3://bucket/prefix: the old manifest off
    first, then the files, then the manifest."""
    from ..faults import retrying

    manifest = verify_export(folder)
    client = client or s3_client()
    bucket, prefix = split_s3_uri(uri)
    retrying(lambda: client.delete_object(Bucket=bucket, Key=_key(prefix, MANIFEST)), f"{uri}: unpublish the old manifest",
             attempts)
    for name in [*manifest["files"], MANIFEST]:
        retrying(lambda name=name: client.upload_file(str(folder / name), bucket, _key(prefix, name)), f"{uri}: upload {name}",
                 attempts)
    return manifest


def fetch_export(uri: str, cache_dir: Path, client=None, attempts: int = 5) -> Path:
    """Download s3://bucket/prefix into cache_dir, verify every checksum, return the folder.

    When the manifest changed while the files came down (a publish replaced the
    version), the download starts over. Raises ValueError naming the file when a
    checksum does not match; nothing unverified is left where a later start would
    pick it up."""
    import time

    client = client or s3_client()
    bucket, prefix = split_s3_uri(uri)
    dest = cache_dir / bucket / (prefix or "_root")
    tmp = dest.with_name(dest.name + ".download")
    for attempt in range(attempts):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            client.download_file(bucket, _key(prefix, MANIFEST), str(tmp / MANIFEST))
            listed = (tmp / MANIFEST).read_bytes()
            for name in json.loads(listed)["files"]:
                client.download_file(bucket, _key(prefix, name), str(tmp / name))
            try:
                verify_export(tmp)
            except ValueError:
                if attempt + 1 < attempts and _manifest_now(client, bucket, _key(prefix, MANIFEST)) != listed:
                    time.sleep(0.2 * (attempt + 1))  # a new version is being published: take it whole
                    continue
                raise
        except ValueError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"{uri}: {err}") from None
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        break
    swap_in(tmp, dest)
    return dest


def _manifest_now(client, bucket: str, key: str) -> bytes | None:
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as err:  # noqa: BLE001 - gone (being republished) or unreachable: not the same manifest
        if type(err).__module__.startswith("botocore"):
            return None
        raise


# ------------------------------------------------------------------ file trees
# A stage sent to another machine gets its inputs, and returns its outputs,
# as a tree of files under s3://bucket/prefix with a manifest written last.
TREE_MANIFEST = "tree-manifest.json"


def _files_under(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and "checkpoint" not in f.relative_to(p).parts[:1])
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: not found (cannot upload it)")
    return out


def put_tree(paths: list[str], uri: str, client=None) -> dict:
    """Upload files and folders (relative paths, kept as they are) to `uri`,
    then a manifest of their sha256; return the manifest."""
    from ..io import sha256_file

    client = client or s3_client()
    bucket, prefix = split_s3_uri(uri)
    files = {f.as_posix(): sha256_file(f) for f in _files_under(paths)}
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"{rel}: only paths inside the working directory can be exchanged")
        client.upload_file(rel, bucket, f"{prefix}/{rel}")
    manifest = {"files": files}
    client.put_object(Bucket=bucket, Key=f"{prefix}/{TREE_MANIFEST}", Body=json.dumps(manifest).encode())
    return manifest


def get_tree(uri: str, dest: Path = Path("."), client=None) -> dict:
    """Download what put_tree uploaded to `uri` into `dest`, checking every sha256
    before a file replaces the local one; return the manifest."""
    from ..io import sha256_file

    client = client or s3_client()
    bucket, prefix = split_s3_uri(uri)
    manifest = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/{TREE_MANIFEST}")["Body"].read())
    for rel, sha in manifest["files"].items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.download")
        client.download_file(bucket, f"{prefix}/{rel}", str(tmp))
        if sha256_file(tmp) != sha:
            tmp.unlink()
            raise ValueError(f"{uri}/{rel}: checksum mismatch after download")
        os.replace(tmp, target)
    return manifest


# ------------------------------------------------------------------ stores of versions
# Promoted versions and the `champion` pointer (instructflow/rounds/champion.py) live in a store:
# an s3:// prefix, or a local folder for a laptop. Both offer the same few operations;
# a folder is published file by file with its manifest of sha256 written LAST, and
# fetched into a folder beside its final place, verified, then renamed in.
FILES_MANIFEST = "files.json"


class FolderStore:
    """A store in a local folder; every write lands whole (temporary file, then rename)."""

    def __init__(self, root: str | Path):
        self.root, self.uri = Path(root), str(root)

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"{name}: not a name inside the store {self.uri}")
        return path

    def read(self, name: str) -> bytes | None:
        path = self._path(name)
        return path.read_bytes() if path.is_file() else None

    def write(self, name: str, data: bytes) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def upload(self, local: Path, name: str) -> None:
        self.write(name, Path(local).read_bytes())

    def download(self, name: str, local: Path) -> None:
        shutil.copyfile(self._path(name), local)

    def names(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        root = self.root.resolve()
        return sorted(p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))


class S3Store:
    """A store under s3://bucket/prefix; each request retried through a storage outage."""

    def __init__(self, uri: str, client=None, attempts: int = 6):
        from ..faults import retrying

        self.uri, self.attempts, self._retrying = uri.rstrip("/"), attempts, retrying
        self.bucket, self.prefix = split_s3_uri(uri)
        self.client = client or s3_client()

    def _call(self, fn, what: str):
        return self._retrying(fn, f"{self.uri}: {what}", self.attempts)

    def read(self, name: str) -> bytes | None:
        def get():
            try:
                return self.client.get_object(Bucket=self.bucket, Key=_key(self.prefix, name))["Body"].read()
            except self.client.exceptions.NoSuchKey:
                return None
        return self._call(get, f"read {name}")

    def write(self, name: str, data: bytes) -> None:
        self._call(lambda: self.client.put_object(Bucket=self.bucket, Key=_key(self.prefix, name), Body=data), f"write {name}")

    def upload(self, local: Path, name: str) -> None:
        self._call(lambda: self.client.upload_file(str(local), self.bucket, _key(self.prefix, name)), f"upload {name}")

    def download(self, name: str, local: Path) -> None:
        self._call(lambda: self.client.download_file(self.bucket, _key(self.prefix, name), str(local)), f"download {name}")

    def names(self, prefix: str) -> list[str]:
        start = _key(self.prefix, prefix)
        out: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            out += [o["Key"][len(self.prefix) + 1 if self.prefix else 0:] for o in page.get("Contents", [])]
        return sorted(out)


def open_store(uri: str) -> FolderStore | S3Store:
    if not uri:
        raise ValueError("no store given (rounds.store: s3://bucket/prefix or a local folder)")
    return S3Store(uri) if uri.startswith("s3://") else FolderStore(uri)


def publish_folder(store, folder: Path, name: str) -> dict:
    """Upload every file of `folder` to `name/` in the store, then `name/files.json` (their sha256) last."""
    from ..io import sha256_file

    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    if not files:
        raise ValueError(f"{folder}: nothing to publish")
    for rel in files:
        store.upload(Path(folder) / rel, f"{name}/{rel}")
    manifest = {"files": files}
    store.write(f"{name}/{FILES_MANIFEST}", json.dumps(manifest, indent=1).encode())
    return manifest


def fetch_folder(store, name: str, dest: Path) -> Path:
    """Download what publish_folder wrote under `name/` into `dest`: beside it first, every sha256
    checked, then renamed in. Raises ValueError naming the file that does not match, leaving
    `dest` as it was."""
    from ..io import sha256_file

    raw = store.read(f"{name}/{FILES_MANIFEST}")
    if raw is None:
        raise ValueError(f"{store.uri}/{name}: no {FILES_MANIFEST} (not published, or not completely)")
    files = json.loads(raw)["files"]
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".download")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, want in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            store.download(f"{name}/{rel}", tmp / rel)
            if sha256_file(tmp / rel) != want:
                raise ValueError(f"{store.uri}/{name}/{rel}: sha256 does not match {FILES_MANIFEST}; refusing the version")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, dest)
    return dest
