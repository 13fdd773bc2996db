"""An S3-compatible server on 127.0.0.1 for the object-store tests: moto's server mode.

:func:`start` runs it in a thread of the test process and returns it with the
environment (endpoint, dummy credentials) its clients need, in this process and in its
children; :func:`client` is a boto3 client of it, to make buckets and damage objects.
"""

import uuid

import pytest


def start(tmp_path_factory):
    """Start moto's server (the test is skipped when moto is not installed)."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] (the test extra) "
                                     "runs the local S3-compatible server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    empty = tmp_path_factory.mktemp("aws") / "none"
    empty.write_text("")  # no AWS profile of this machine is read
    env = {"TRAX_ATTR_S3_ENDPOINT": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty)}
    return server, env


def client(env):
    import boto3

    return boto3.client("s3", endpoint_url=env["TRAX_ATTR_S3_ENDPOINT"],
                        region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def new_bucket(env) -> str:
    """A new, empty bucket on the server of ``env``; its name."""
    name = f"trax-{uuid.uuid4().hex[:12]}"
    client(env).create_bucket(Bucket=name)
    return name


def keys(env, bucket: str) -> list[str]:
    """The keys of every object of ``bucket``."""
    pages = client(env).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))
