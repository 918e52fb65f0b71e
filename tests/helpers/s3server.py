"""A real S3 server on loopback for the object-storage tests: moto's standalone server
(`moto_server`, the S3 HTTP API in a separate process). `.ci/run` starts one (`cd tests &&
python -m helpers.s3server --serve-for-ci`) and exports DCKPT_TEST_S3_ENDPOINT; without it,
the first test that needs a server starts its own.

Credentials and endpoint reach the clients the standard way (AWS_* variables), so the code
under test finds them through the same chain a user's job would."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from . import free_port

ENDPOINT_VAR = "DCKPT_TEST_S3_ENDPOINT"


def _up(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(endpoint, timeout=1).close()
        return True
    except OSError:
        return False


def start() -> tuple[str, subprocess.Popen]:
    """Start moto_server on a free loopback port; return its endpoint and process."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not _up(endpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"moto_server did not start on {endpoint}")
        time.sleep(0.1)
    return endpoint, proc


def client_env(endpoint: str) -> dict[str, str]:
    """The standard variables every S3 client (s3fs, boto3, obstore) reads."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def new_bucket(endpoint: str) -> str:
    """A fresh, empty bucket (named per test, so tests never see each other's objects)."""
    import boto3
    name = f"t-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", **_boto_args(endpoint)).create_bucket(Bucket=name)
    return name


def _boto_args(endpoint: str) -> dict:
    env = client_env(endpoint)
    return {"endpoint_url": endpoint, "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": env["AWS_DEFAULT_REGION"]}


def existing_endpoint() -> str | None:
    endpoint = os.environ.get(ENDPOINT_VAR)
    return endpoint if endpoint and _up(endpoint) else None


if __name__ == "__main__" and sys.argv[1:] == ["--serve-for-ci"]:
    # Start a server that outlives this process; print the shell lines that export it.
    endpoint, proc = start()
    print(f"export {ENDPOINT_VAR}={endpoint} DCKPT_TEST_S3_PID={proc.pid}")
