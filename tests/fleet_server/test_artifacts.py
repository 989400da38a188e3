"""Artifact downloads: whole, by Range (206/416), ETag, and names that are not sha256."""

from __future__ import annotations

import hashlib

from fleet_support import SimDevice, upload


def _setup(server, bundles) -> tuple[SimDevice, str, bytes]:
    data = bundles.ekb["v1"]["raspberry-pi-5"].read_bytes()
    assert upload(server.admin, "digits", [bundles.ekb["v1"]["raspberry-pi-5"]]).status_code == 201
    d = SimDevice(server, "pi-dl").enroll()
    assert server.admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "waves": [100]}).status_code == 201
    p = d.poll()
    return d, p["artifact"]["url"], data


def test_download_whole_and_by_range(live_server, fleet_bundles):
    d, url, data = _setup(live_server, fleet_bundles)
    sha = hashlib.sha256(data).hexdigest()
    assert url == f"/v1/artifacts/{sha}"
    r = d.http.get(url)
    assert r.status_code == 200 and r.content == data
    assert r.headers["etag"] == f'"{sha}"' and r.headers["accept-ranges"] == "bytes" and int(r.headers["content-length"]) == len(data)
    assert d.http.get(url, headers={"If-None-Match": f'"{sha}"'}).status_code == 304
    n = len(data)
    cases = {"bytes=0-99": (0, 99), "bytes=100-": (100, n - 1), f"bytes=10-{n + 1000}": (10, n - 1), "bytes=-50": (n - 50, n - 1),
             f"bytes={n - 1}-{n - 1}": (n - 1, n - 1)}
    for header, (first, last) in cases.items():
        r = d.http.get(url, headers={"Range": header})
        assert r.status_code == 206, header
        assert r.content == data[first:last + 1], header
        assert r.headers["content-range"] == f"bytes {first}-{last}/{n}"
    # resuming a download: first half, then the rest from where it stopped
    half = d.http.get(url, headers={"Range": f"bytes=0-{n // 2 - 1}"}).content
    rest = d.http.get(url, headers={"Range": f"bytes={len(half)}-"}).content
    assert hashlib.sha256(half + rest).hexdigest() == sha
    for header in (f"bytes={n}-", f"bytes={n + 5}-{n + 10}", "bytes=-0", "bytes=50-10"):
        r = d.http.get(url, headers={"Range": header})
        assert r.status_code == 416 and r.json()["error"]["code"] == "range_not_satisfiable", header
    for header in ("bytes=0-1,5-6", "items=0-5", "bytes=a-b"):  # not understood: the whole file
        r = d.http.get(url, headers={"Range": header})
        assert r.status_code == 200 and r.content == data, header
    # an If-Range that no longer matches gets the whole file
    assert d.http.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'}).status_code == 200
    assert live_server.admin.get(url, headers={"Range": "bytes=0-9"}).content == data[:10]


def test_names_that_are_not_a_sha256_never_touch_the_filesystem(live_server, fleet_bundles):
    d, url, _ = _setup(live_server, fleet_bundles)
    sha = url.rsplit("/", 1)[1]
    for bad in ("..", "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", sha.upper(), sha[:-1], sha + "0", sha[:2] + "/" + sha,
                "0" * 64, "%00" + sha[3:]):
        r = live_server.admin.get(f"/v1/artifacts/{bad}")
        assert r.status_code == 404, (bad, r.status_code)
        assert r.json()["error"]["code"] == "not_found"
    # a raw request path with '..' segments (no client-side normalisation)
    import socket

    with socket.create_connection(("127.0.0.1", live_server.port)) as s:
        s.sendall(f"GET /v1/artifacts/../../../etc/passwd HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {live_server.admin_token}\r\n"
                  "Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404") and b"root:" not in answer
