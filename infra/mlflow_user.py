#!/usr/bin/env python3
"""Create the pipeline's MLflow user, or set its password when it exists: run once after the
server first starts, and again to rotate the password. Needs only Python 3's standard library.

    kubectl -n genreflow port-forward svc/mlflow 5000:5000 &
    python3 infra/mlflow_user.py http://localhost:5000 \\
        --admin infra/base/secrets/mlflow-admin.env \\
        --user infra/runner/secrets/mlflow-pipeline.env

The admin signs in with MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD from --admin; the user is
MLFLOW_TRACKING_USERNAME/PASSWORD from --user: the same files the cluster's Secrets are made of.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def read_env(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def call(url: str, method: str, path: str, body: dict, auth: tuple[str, str]) -> int:
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    request = urllib.request.Request(
        f"{url.rstrip('/')}/api/2.0/mlflow/users/{path}",
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        if error.code == 400 and "RESOURCE_ALREADY_EXISTS" in detail:
            return 409
        message = f"mlflow_user: {method} {path}: HTTP {error.code}: {detail[:300]}"
        raise SystemExit(message) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the MLflow server, e.g. http://localhost:5000")
    parser.add_argument("--admin", type=Path, required=True, help="the admin's .env file")
    parser.add_argument("--user", type=Path, required=True, help="the pipeline user's .env file")
    args = parser.parse_args(argv)
    admin, user = read_env(args.admin), read_env(args.user)
    auth = (admin["MLFLOW_AUTH_ADMIN_USERNAME"], admin["MLFLOW_AUTH_ADMIN_PASSWORD"])
    body = {
        "username": user["MLFLOW_TRACKING_USERNAME"],
        "password": user["MLFLOW_TRACKING_PASSWORD"],
    }
    if call(args.url, "POST", "create", body, auth) == 409:
        call(args.url, "PATCH", "update-password", body, auth)
        print(f"mlflow_user: {body['username']} exists; its password is set")
    else:
        print(f"mlflow_user: created {body['username']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
