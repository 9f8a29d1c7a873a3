#!/usr/bin/env python3
"""Create the S3 bucket named by S3_BUCKET if it does not exist (docker-compose's one-shot).

Retries while the S3 server starts; exits 0 once the bucket exists, non-zero after a minute.
"""

from __future__ import annotations

import os
import sys
import time

import boto3
from botocore.exceptions import BotoCoreError, ClientError


def main() -> int:
    bucket = os.environ["S3_BUCKET"]
    client = boto3.client(
        "s3",
        endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
        aws_access_key_id=os.environ.get("S3_ACCESS_KEY_ID") or None,
        aws_secret_access_key=os.environ.get("S3_SECRET_ACCESS_KEY") or None,
        region_name=os.environ.get("S3_REGION") or "us-east-1",
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            client.head_bucket(Bucket=bucket)
            print(f"bucket {bucket} exists")
            return 0
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchBucket", "NotFound"}:
                try:
                    client.create_bucket(Bucket=bucket)
                    print(f"bucket {bucket} created")
                    return 0
                except ClientError as create_error:
                    error: Exception = create_error
            else:
                error = exc
        except BotoCoreError as exc:  # not reachable yet
            error = exc
        if time.monotonic() > deadline:
            print(f"cannot create bucket {bucket}: {type(error).__name__}", file=sys.stderr)
            return 1
        time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
