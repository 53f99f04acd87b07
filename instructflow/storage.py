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

from .export import MANIFEST, verify_export
from .io import swap_in


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
    from .faults import retrying

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
    from .io import sha256_file

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
    from .io import sha256_file

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
