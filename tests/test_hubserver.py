"""The local Hub server, exercised through the real `hf_hub_download` code path."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import pytest
from huggingface_hub import constants, file_download, hf_hub_download
from huggingface_hub.utils import _http as hf_http
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hubserver import git_blob_sha1

REPO = "eo-org/tiny-backbone"
WEIGHTS = "model.safetensors"  # LFS by the Hub's default patterns
CONFIG = "config.json"  # a regular git file


def _payload(size: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(size))


def _repo_cache() -> Path:
    return Path(constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}"


def _blobs() -> list[Path]:
    blobs = _repo_cache() / "blobs"
    return sorted(blobs.iterdir()) if blobs.is_dir() else []


def _raw_request(endpoint: str, method: str, path: str, headers: dict | None = None):
    url = urlsplit(endpoint)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# -- downloads ---------------------------------------------------------------


def test_regular_file_is_served_directly_with_git_sha1_etag(local_hub):
    data = b'{"embed_dim": 8}'
    commit = local_hub.add_file(REPO, CONFIG, data)

    path = Path(hf_hub_download(REPO, CONFIG))

    assert path.read_bytes() == data
    assert path.parent.name == commit
    assert path.resolve().name == git_blob_sha1(data)
    assert (_repo_cache() / "refs" / "main").read_text() == commit
    assert local_hub.requests == [
        ("HEAD", f"/{REPO}/resolve/main/{CONFIG}"),
        ("GET", f"/{REPO}/resolve/main/{CONFIG}"),
    ]


def test_lfs_file_redirects_to_cdn_and_is_cached_under_sha256(local_hub):
    data = _payload(5000)
    local_hub.add_file(REPO, WEIGHTS, data)

    path = Path(hf_hub_download(REPO, WEIGHTS))

    assert path.read_bytes() == data
    assert path.resolve().name == hashlib.sha256(data).hexdigest()
    (head, get) = local_hub.requests
    assert head == ("HEAD", f"/{REPO}/resolve/main/{WEIGHTS}")
    assert get[0] == "GET" and get[1].startswith("/lfs/")
    assert local_hub.downloads(REPO, WEIGHTS) == [None]


def test_resolve_headers_follow_the_hub_and_carry_no_xet_metadata(local_hub):
    data = _payload(300)
    commit = local_hub.add_file(REPO, WEIGHTS, data)
    status, headers, _ = _raw_request(local_hub.endpoint, "HEAD", f"/{REPO}/resolve/main/{WEIGHTS}")

    assert status == 302
    assert headers["X-Repo-Commit"] == commit
    assert headers["X-Linked-Etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert headers["X-Linked-Size"] == "300"
    assert headers["Location"].startswith(local_hub.cdn_endpoint)
    assert not [name for name in headers if "xet" in name.lower()]


def test_pinned_commit_and_main_serve_their_own_versions(local_hub):
    old, new = _payload(1000, seed=1), _payload(1000, seed=2)
    old_commit = local_hub.add_file(REPO, WEIGHTS, old)
    new_commit = local_hub.add_file(REPO, WEIGHTS, new)
    assert old_commit != new_commit

    assert Path(hf_hub_download(REPO, WEIGHTS, revision=old_commit)).read_bytes() == old
    assert Path(hf_hub_download(REPO, WEIGHTS)).read_bytes() == new
    assert Path(hf_hub_download(REPO, WEIGHTS, revision=new_commit)).read_bytes() == new
    assert sorted(p.name for p in (_repo_cache() / "snapshots").iterdir()) == sorted([old_commit, new_commit])


def test_explicit_commit_sha_groups_files(local_hub):
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert local_hub.add_file(REPO, WEIGHTS, b"w", revision=commit) == commit
    assert local_hub.add_file(REPO, CONFIG, b"{}", revision=commit) == commit

    assert Path(hf_hub_download(REPO, CONFIG, revision=commit)).read_bytes() == b"{}"
    assert Path(hf_hub_download(REPO, WEIGHTS)).parent.name == commit  # main points at it


def test_cached_file_is_reused_without_a_second_get(local_hub):
    local_hub.add_file(REPO, WEIGHTS, _payload(2000))

    first = hf_hub_download(REPO, WEIGHTS)
    second = hf_hub_download(REPO, WEIGHTS)

    assert first == second
    assert len(local_hub.downloads(REPO, WEIGHTS)) == 1
    # A branch revision still costs one HEAD per call to learn the current commit.
    assert [m for m, _ in local_hub.requests].count("HEAD") == 2


# -- server down -------------------------------------------------------------


def test_stop_refuses_new_connections_and_drops_open_ones(local_hub):
    local_hub.add_file(REPO, CONFIG, b"{}")
    url = urlsplit(local_hub.endpoint)
    keep_alive = http.client.HTTPConnection(url.hostname, url.port, timeout=2)
    keep_alive.request("HEAD", f"/{REPO}/resolve/main/{CONFIG}")
    response = keep_alive.getresponse()
    response.read()
    assert response.status == 200 and not response.will_close

    local_hub.stop()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((url.hostname, url.port), timeout=2).close()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        keep_alive.request("HEAD", f"/{REPO}/resolve/main/{CONFIG}")
        keep_alive.getresponse()
    keep_alive.close()


def test_cache_is_used_when_server_is_down(local_hub, no_retry_sleep):
    data = _payload(1500)
    commit = local_hub.add_file(REPO, WEIGHTS, data)
    pinned = hf_hub_download(REPO, WEIGHTS, revision=commit)
    by_branch = hf_hub_download(REPO, WEIGHTS)
    local_hub.stop()

    # A 40-hex revision already in the cache returns before any network call.
    assert hf_hub_download(REPO, WEIGHTS, revision=commit, local_files_only=False) == pinned
    # A branch revision: the HEAD fails (connection refused), then refs/main is used.
    assert hf_hub_download(REPO, WEIGHTS, local_files_only=False) == by_branch
    assert hf_hub_download(REPO, WEIGHTS, local_files_only=True) == by_branch
    assert Path(by_branch).read_bytes() == data

    # Not cached: the HEAD is retried with backoff (5 retries, ~23 s unpatched), then it gives up.
    heads_before = len(local_hub.requests)
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO, CONFIG)
    assert len(local_hub.requests) == heads_before  # nothing reached the stopped server


# -- errors ------------------------------------------------------------------


def test_missing_repo_revision_and_file_raise_hub_errors(local_hub):
    commit = local_hub.add_file(REPO, WEIGHTS, b"w")

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("eo-org/does-not-exist", WEIGHTS)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, WEIGHTS, revision="f" * 40)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, WEIGHTS, revision="v9.9")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.safetensors")
    # huggingface_hub caches the absence of a file per commit.
    assert (_repo_cache() / ".no_exist" / commit / "missing.safetensors").is_file()


# -- byte ranges and interrupted transfers ------------------------------------


@pytest.mark.parametrize(
    ("range_header", "status", "content_range", "expected"),
    [
        ("bytes=10-19", 206, "bytes 10-19/100", slice(10, 20)),
        ("bytes=90-", 206, "bytes 90-99/100", slice(90, 100)),
        ("bytes=-5", 206, "bytes 95-99/100", slice(95, 100)),
        ("bytes=95-500", 206, "bytes 95-99/100", slice(95, 100)),
        ("bytes=100-", 416, "bytes */100", slice(0, 0)),
        ("items=0-1", 200, None, slice(0, 100)),
    ],
)
def test_range_requests(local_hub, range_header, status, content_range, expected):
    data = _payload(100)
    local_hub.add_file(REPO, CONFIG, data)

    got_status, headers, body = _raw_request(
        local_hub.endpoint, "GET", f"/{REPO}/resolve/main/{CONFIG}", {"Range": range_header}
    )

    assert got_status == status
    assert headers.get("Content-Range") == content_range
    assert body == data[expected]


def test_interrupted_transfer_is_resumed_with_range(local_hub, monkeypatch, no_retry_sleep):
    data = _payload(4000)
    local_hub.add_file(REPO, WEIGHTS, data)
    # httpx only hands complete chunks to huggingface_hub (10 MB by default); a buffered partial
    # chunk is lost when the connection drops. Small chunks make the resume point observable.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256)
    local_hub.truncate_next(REPO, WEIGHTS, nbytes=1000)

    path = Path(hf_hub_download(REPO, WEIGHTS))

    assert path.read_bytes() == data
    assert local_hub.downloads(REPO, WEIGHTS) == [None, "bytes=768-"]


def test_repeated_interruptions_are_resumed_while_bytes_keep_arriving(local_hub, monkeypatch, no_retry_sleep):
    data = _payload(4000)
    local_hub.add_file(REPO, WEIGHTS, data)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 500)
    local_hub.truncate_next(REPO, WEIGHTS, nbytes=1000, times=3)

    assert Path(hf_hub_download(REPO, WEIGHTS)).read_bytes() == data
    assert local_hub.downloads(REPO, WEIGHTS) == [None, "bytes=1000-", "bytes=2000-", "bytes=3000-"]


def test_stalled_transfer_fails_without_leaving_a_blob_then_succeeds(local_hub, no_retry_sleep):
    data = _payload(3000)
    local_hub.add_file(REPO, WEIGHTS, data)
    # http_get gives up after 1 + 5 attempts that deliver no new bytes.
    local_hub.truncate_next(REPO, WEIGHTS, nbytes=0, times=6)

    with pytest.raises(httpx2.RemoteProtocolError):
        hf_hub_download(REPO, WEIGHTS)

    assert len(local_hub.downloads(REPO, WEIGHTS)) == 6
    assert _blobs() == []  # the partial `.incomplete` file was removed too
    assert not (_repo_cache() / "snapshots").exists() or not any((_repo_cache() / "snapshots").rglob(WEIGHTS))

    assert Path(hf_hub_download(REPO, WEIGHTS)).read_bytes() == data


def test_corrupted_file_is_not_detected_by_huggingface_hub(local_hub):
    data = _payload(2048)
    local_hub.add_file(REPO, WEIGHTS, data)
    local_hub.corrupt(REPO, WEIGHTS)

    path = Path(hf_hub_download(REPO, WEIGHTS))

    # Same size and cached under the advertised sha256, but the content differs:
    # hf_hub_download only checks the size, so callers must verify the hash.
    served = path.read_bytes()
    assert len(served) == len(data) and served != data
    assert path.resolve().name == hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(served).hexdigest() != path.resolve().name


def test_environment_points_at_the_local_hub(local_hub, tmp_path):
    assert os.environ["HF_ENDPOINT"] == local_hub.endpoint == constants.ENDPOINT
    assert constants.HF_HUB_CACHE == os.environ["HF_HUB_CACHE"]
    assert constants.HF_HUB_DISABLE_XET and not constants.is_offline_mode()
    assert "HF_HUB_OFFLINE" not in os.environ and "EOBACKBONES_OFFLINE" not in os.environ
    assert Path(os.environ["EOBACKBONES_HOME"]).is_dir()
    assert Path(os.environ["HF_HOME"]) != Path(os.environ["EOBACKBONES_HOME"])
