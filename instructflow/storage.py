"""Object storage (S3 API) for what DVC does not do: publishing an exported RM
and fetching it with checksum verification.

Publishing uploads every file first and the manifest LAST, so a reader that
finds a manifest finds a complete model. Fetching downloads the manifest, then
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


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, prefix.strip("/")


def s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


def publish_export(folder: Path, uri: str, client=None) -> dict:
    """Upload a verified export folder to s3://bucket/prefix, manifest last."""
    manifest = verify_export(folder)
    client = client or s3_client()
    bucket, prefix = split_s3_uri(uri)
    for name in manifest["files"]:
        client.upload_file(str(folder / name), bucket, f"{prefix}/{name}" if prefix else name)
    client.upload_file(str(folder / MANIFEST), bucket, f"{prefix}/{MANIFEST}" if prefix else MANIFEST)
    return manifest


def fetch_export(uri: str, cache_dir: Path, client=None) -> Path:
    """Download s3://bucket/prefix into cache_dir, verify every checksum, return the folder.

    Raises ValueError naming the file when a checksum does not match; nothing
    unverified is left where a later start would pick it up."""
    client = client or s3_client()
    bucket, prefix = split_s3_uri(uri)
    key = lambda name: f"{prefix}/{name}" if prefix else name  # noqa: E731
    dest = cache_dir / bucket / (prefix or "_root")
    tmp = dest.with_name(dest.name + ".download")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        client.download_file(bucket, key(MANIFEST), str(tmp / MANIFEST))
        for name in json.loads((tmp / MANIFEST).read_text())["files"]:
            client.download_file(bucket, key(name), str(tmp / name))
        verify_export(tmp)
    except ValueError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{uri}: {err}") from None
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest
