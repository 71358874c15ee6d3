"""The same job through Datadog's official Python client, for comparison (``run.py --peers``).

    python bench/peers.py --url http://127.0.0.1:PORT --input input.csv --mode single
    python bench/peers.py --url http://127.0.0.1:PORT --input input.csv --mode list

``single`` is the reference page's example in a loop: one request per email. ``list`` groups
the emails per token into list-form requests of ``--batch-size``, built from the client's
model classes. Either way it is the plain synchronous client with its defaults; it does no
validation, keeps no report and does not retry, so it does less than the worker does.
Needs the ``bench`` extra (``pip install -e '.[bench]'``). Prints one JSON line: emails,
requests, failures.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Iterator
from itertools import islice

from datadog_api_client import ApiClient, Configuration
from datadog_api_client.v1.api.dashboards_api import DashboardsApi
from datadog_api_client.v1.model.dashboard_invite_type import DashboardInviteType
from datadog_api_client.v1.model.shared_dashboard_invites import SharedDashboardInvites
from datadog_api_client.v1.model.shared_dashboard_invites_data_list import (
    SharedDashboardInvitesDataList,
)
from datadog_api_client.v1.model.shared_dashboard_invites_data_object import (
    SharedDashboardInvitesDataObject,
)
from datadog_api_client.v1.model.shared_dashboard_invites_data_object_attributes import (
    SharedDashboardInvitesDataObjectAttributes,
)


def invitation(email: str) -> SharedDashboardInvitesDataObject:
    return SharedDashboardInvitesDataObject(
        attributes=SharedDashboardInvitesDataObjectAttributes(email=email),
        type=DashboardInviteType.PUBLIC_DASHBOARD_INVITATION,
    )


def pairs(path: str, rows: int | None) -> Iterator[tuple[str, str]]:
    """The first ``rows`` pairs of a CSV or JSONL input."""
    with open(path, newline="") as f:
        records = csv.DictReader(f) if path.endswith(".csv") else map(json.loads, f)
        for row in islice(records, rows):
            yield row["token"], row["email"]


def batches(path: str, rows: int | None, size: int) -> Iterator[tuple[str, list[str]]]:
    """Per-token lists of ``size`` emails, the rest at the end."""
    buffers: dict[str, list[str]] = {}
    for token, email in pairs(path, rows):
        buffer = buffers.setdefault(token, [])
        buffer.append(email)
        if len(buffer) == size:
            yield token, buffers.pop(token)
    yield from buffers.items()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the emulator, http://127.0.0.1:PORT")
    parser.add_argument("--input", required=True, help="a token,email CSV or a JSONL file")
    parser.add_argument("--mode", choices=("single", "list"), required=True)
    parser.add_argument("--rows", type=int, default=None, help="only the first ROWS rows")
    parser.add_argument("--batch-size", type=int, default=100)
    opts = parser.parse_args()
    if not opts.url.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise SystemExit("peers.py only talks to an emulator on loopback")

    configuration = Configuration(host=opts.url)
    configuration.api_key["apiKeyAuth"] = os.environ["DD_API_KEY"]
    configuration.api_key["appKeyAuth"] = os.environ["DD_APP_KEY"]
    emails = requests = failures = 0
    with ApiClient(configuration) as api_client:
        api = DashboardsApi(api_client)
        if opts.mode == "single":
            work: Iterator[tuple[str, list[str]]] = (
                (token, [email]) for token, email in pairs(opts.input, opts.rows)
            )
        else:
            work = batches(opts.input, opts.rows, opts.batch_size)
        for token, group in work:
            if opts.mode == "single":
                body = SharedDashboardInvites(data=invitation(group[0]))
            else:
                data = SharedDashboardInvitesDataList([invitation(e) for e in group])
                body = SharedDashboardInvites(data=data)
            requests += 1
            try:
                api.send_public_dashboard_invitation(token=token, body=body)
            except Exception:  # counted: a user's loop would log it and go on
                failures += 1
            else:
                emails += len(group)
    print(json.dumps({"emails": emails, "requests": requests, "failures": failures}))


if __name__ == "__main__":
    main()
