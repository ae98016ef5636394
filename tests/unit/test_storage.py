"""The storage contract (server/storage/base.py), run against every backend: the local folder,
and an S3 bucket on a real moto server process (tests/s3.py; a fresh bucket per test, keys under
a prefix). A new backend joins by adding its factory to BACKENDS."""

import os
import re
import threading

import pytest

from server.settings import Settings
from server.storage import InvalidKey, LocalStorage, NoLocalFiles, Storage, open_storage

# The moto server fixtures, registered once for the run: one server for every module using them.
pytest_plugins = ["tests.s3"]

BASE = "http://vace.test:8000"
PREFIX = "some/prefix"


def _local(request, tmp_path):
    return LocalStorage(tmp_path / "media")


def _s3(request, tmp_path):
    from server.storage.s3 import S3Storage

    server = request.getfixturevalue("moto_server")
    return S3Storage(
        request.getfixturevalue("s3_bucket"), PREFIX, endpoint_url=server.endpoint, region="us-east-1"
    )


BACKENDS = {"local": _local, "s3": _s3}


@pytest.fixture(params=sorted(BACKENDS))
def storage(request, tmp_path) -> Storage:
    return BACKENDS[request.param](request, tmp_path)


def _no_file_for(storage, key):
    """local_path's answer for a key that names nothing: KeyError on a backend with files, and
    NoLocalFiles (never a path) on one without."""
    with pytest.raises(KeyError if storage.has_local_files else NoLocalFiles):
        storage.local_path(key)


BAD_KEYS = [
    "",
    "../outside.txt",
    "outputs/../../outside.txt",
    "outputs/./x.mp4",
    "/etc/passwd",
    "outputs//x.mp4",
    "outputs/",
    "outputs/\0/x.mp4",
    "outputs/x.mp4\0.png",
    "outputs\\..\\..\\jobs.sqlite3",
    "a" * 300,  # one component longer than any file system allows
    "/".join(["b" * 250] * 30),  # longer than PATH_MAX and S3's 1024-byte keys
    "outputs/\udcff\udcfe",  # what undecodable bytes in a URL path turn into
]


def test_round_trip_bytes_and_file(storage, tmp_path):
    key = storage.new_key("outputs/job1", "output.mp4")
    assert storage.put_bytes(key, b"\0\1video") == key
    assert storage.exists(key) and storage.read_bytes(key) == b"\0\1video"
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20))  # more than one copy chunk
    k2 = storage.put_file(storage.new_key("outputs/job1", "big.bin"), src)
    assert storage.read_bytes(k2) == src.read_bytes()
    # A put replaces what was there.
    storage.put_bytes(key, b"second")
    assert storage.read_bytes(key) == b"second"


def test_new_keys_are_fresh_and_safe(storage):
    a, b = storage.new_key("uploads", "ref.png"), storage.new_key("uploads", "ref.png")
    assert a != b and a.startswith("uploads/") and a.endswith("/ref.png")
    assert len(a.split("/")[1]) == 32  # the unguessable token
    for name in ("../../etc/passwd", "a/b\\c d.png", "", ".", "..", "x" * 500, "é" * 300, "\0x"):
        key = storage.new_key("uploads", name)
        storage.put_bytes(key, b"ok")  # every key new_key makes is one every backend can hold
        assert storage.read_bytes(key) == b"ok", name
        parts = key.split("/")
        assert len(parts) == 3 and parts[2] not in ("", ".", "..") and "\0" not in key and "\\" not in key


@pytest.mark.parametrize("key", BAD_KEYS)
def test_keys_that_escape_or_cannot_be_stored_are_refused(storage, tmp_path, key):
    with pytest.raises(InvalidKey):
        storage.put_bytes(key, b"x")
    with pytest.raises(KeyError):
        storage.read_bytes(key)
    with pytest.raises(KeyError):
        storage.stat(key)
    with pytest.raises(KeyError):
        storage.open_range(key, 0, 1)
    _no_file_for(storage, key)
    assert storage.exists(key) is False
    assert not (tmp_path / "outside.txt").exists()


def test_invalid_key_is_a_key_error(storage):
    # Readers answer 404 for both "not stored" and "not a key" by catching KeyError alone.
    assert issubclass(InvalidKey, KeyError)


def test_missing_keys(storage):
    key = storage.new_key("outputs/none", "x.mp4")
    assert not storage.exists(key)
    with pytest.raises(KeyError):
        storage.read_bytes(key)
    for start, stop in ((0, None), (0, 1), (5, 5)):  # even an empty range says "not stored"
        with pytest.raises(KeyError):
            storage.open_range(key, start, stop)
    with pytest.raises(KeyError):
        storage.stat(key)
    _no_file_for(storage, key)
    # A "folder" of stored keys is not itself a stored object.
    storage.put_bytes(key, b"x")
    prefix = key.rsplit("/", 1)[0]
    assert not storage.exists(prefix)
    with pytest.raises(KeyError):
        storage.read_bytes(prefix)
    with pytest.raises(KeyError):
        storage.stat(prefix)


def test_url_and_key_round_trip(storage):
    key = storage.new_key("outputs/job1", "output.mp4")
    url = storage.url(BASE + "/", key)
    assert url == f"{BASE}/media/{key}"
    assert storage.key_from_url(url, ["http://other.test", BASE]) == key
    assert storage.key_from_url(url + "?download=1", [BASE]) == key
    assert storage.key_from_url(url, ["http://other.test"]) is None
    assert storage.key_from_url(f"{BASE}/api/v3/predictions/x", [BASE]) is None
    assert storage.key_from_url(url, [""]) is None


def test_local_path_serves_the_stored_bytes(storage):
    key = storage.put_bytes(storage.new_key("outputs/j", "o.mp4"), b"ranged")
    if not storage.has_local_files:
        with pytest.raises(NoLocalFiles, match="keeps no local files"):
            storage.local_path(key)
        return
    path = storage.local_path(key)
    with open(path, "rb") as f:
        f.seek(2)
        assert f.read(3) == b"nge"


def test_stat_and_ranged_reads(storage):
    data = os.urandom((1 << 20) + 12345)  # more than one chunk of a ranged read
    key = storage.put_bytes(storage.new_key("outputs/j", "o.mp4"), data)
    st = storage.stat(key)
    assert (st.key, st.size) == (key, len(data)) and st.mtime > 0
    assert st.mtime == pytest.approx(next(iter(storage.iter_objects(key))).mtime)
    for start, stop in (
        (0, None),
        (0, 1),
        (2, 5),
        (1000, (1 << 20) + 7),
        (len(data) - 3, None),
        (7, len(data)),
    ):
        assert b"".join(storage.open_range(key, start, stop)) == data[start:stop], (start, stop)
    assert b"".join(storage.open_range(key, 4, 4)) == b""
    # A stop past the end: what there is.
    assert b"".join(storage.open_range(key, len(data) - 2, len(data) + 100)) == data[-2:]
    assert b"".join(storage.open_range(key, len(data) + 5, None)) == b""
    # A reader that stops early releases the object (the file, the HTTP connection).
    it = storage.open_range(key)
    assert next(iter(it))
    it.close()
    empty = storage.put_bytes(storage.new_key("outputs/j", "empty.bin"), b"")
    assert storage.stat(empty).size == 0 and b"".join(storage.open_range(empty)) == b""


def test_put_is_atomic_for_readers(storage):
    """Readers racing a writer see the old or the new bytes whole, never a mix or a prefix."""
    key = storage.put_bytes(storage.new_key("outputs/atomic", "o.bin"), b"A" * 100_000)
    seen: set[bytes] = set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(storage.read_bytes(key))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(30):
            storage.put_bytes(key, bytes([65 + i % 2]) * 100_000)
    finally:
        stop.set()
        t.join()
    assert seen and seen <= {b"A" * 100_000, b"B" * 100_000}


def test_local_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    """A write that fails before its rename leaves the old object and no temporary file."""
    st = LocalStorage(tmp_path / "media")
    key = st.put_bytes(st.new_key("outputs/atomic", "o.bin"), b"A" * 100_000)
    folder = st.local_path(key).parent

    class Boom(Exception):
        pass

    def failing_fsync(fd):
        raise Boom

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(Boom):
        st.put_bytes(key, b"B" * 100_000)
    fresh = st.new_key("outputs/atomic", "new.bin")
    with pytest.raises(Boom):
        st.put_bytes(fresh, b"C")
    monkeypatch.undo()
    assert st.read_bytes(key) == b"A" * 100_000 and not st.exists(fresh)
    assert [p.name for p in folder.iterdir()] == ["o.bin"]
    assert not any(p.name.endswith(".part") for p in st.root.rglob("*"))


def test_open_storage_picks_the_backend(tmp_path):
    st = open_storage(Settings(data_dir=tmp_path))
    assert isinstance(st, LocalStorage) and st.root == (tmp_path / "media").resolve()
    for url in ("gs://bucket/x", "s3:///x", "/srv/media", "s3://bucket/x?versioned=1"):
        with pytest.raises(ValueError, match="WAN_VACE_STORAGE_URL must be s3://bucket"):
            open_storage(Settings(data_dir=tmp_path, storage_url=url))
    # Presigned URLs are a bucket's: the local folder has none to give.
    with pytest.raises(ValueError, match="WAN_VACE_MEDIA_URLS=presigned needs S3 storage"):
        open_storage(Settings(data_dir=tmp_path, media_urls="presigned"))


def test_open_storage_opens_and_checks_the_bucket(tmp_path, moto_server, s3_bucket):
    from server.storage.s3 import S3Storage

    def settings(url, **kw):
        return Settings(data_dir=tmp_path, storage_url=url, s3_endpoint_url=moto_server.endpoint, **kw)

    st = open_storage(settings(f"s3://{s3_bucket}/a/b/", presign_seconds=60))
    assert isinstance(st, S3Storage) and (st.bucket, st.prefix, st.presign_seconds) == (s3_bucket, "a/b", 60)
    assert not st.presigned_urls and not (tmp_path / "media").exists()  # nothing local is made
    key = st.put_bytes("outputs/j/t/o.mp4", b"x")
    assert moto_server.client().get_object(Bucket=s3_bucket, Key="a/b/" + key)["Body"].read() == b"x"
    root = open_storage(settings(f"s3://{s3_bucket}", media_urls="presigned"))
    assert root.prefix == "" and root.presigned_urls and root.read_bytes("a/b/" + key) == b"x"
    with pytest.raises(RuntimeError, match="the S3 bucket 'no-such-bucket' does not exist"):
        open_storage(settings("s3://no-such-bucket/x"))


def test_open_storage_without_boto3_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "boto3", None)  # what an absent package looks like to import
    monkeypatch.delitem(sys.modules, "server.storage.s3", raising=False)
    with pytest.raises(RuntimeError, match=r"boto3 is not installed .*pip install 'wan-vace\[cluster\]'"):
        open_storage(Settings(data_dir=tmp_path, storage_url="s3://bucket/x"))


def test_symlink_out_of_the_root_is_refused(tmp_path):
    st = LocalStorage(tmp_path / "media")
    (tmp_path / "secret.txt").write_text("s")
    (st.root / "outputs").mkdir()
    (st.root / "outputs" / "link").symlink_to(tmp_path)
    assert not st.exists("outputs/link/secret.txt")
    with pytest.raises(KeyError):
        st.read_bytes("outputs/link/secret.txt")


# Listing and deleting (what retention needs) ---------------------------------------------------
def _put_tree(storage) -> dict[str, bytes]:
    blobs = {
        storage.new_key("outputs/job1", "output.mp4"): b"v" * 10,
        storage.new_key("outputs/job1", "other.mp4"): b"w" * 3,
        storage.new_key("outputs/job10", "output.mp4"): b"x" * 7,  # shares job1's first letters
        storage.new_key("uploads", "ref.png"): b"p" * 5,
    }
    for k, v in blobs.items():
        storage.put_bytes(k, v)
    return blobs


def test_iter_objects_lists_whole_components_with_sizes(storage):
    blobs = _put_tree(storage)
    everything = {o.key: o.size for o in storage.iter_objects("")}
    assert everything == {k: len(v) for k, v in blobs.items()}
    job1 = {o.key for o in storage.iter_objects("outputs/job1")}
    assert job1 == {k for k in blobs if k.startswith("outputs/job1/")}  # not job10's
    one = next(iter(job1))
    assert [o.key for o in storage.iter_objects(one)] == [one]  # a key is its own prefix
    assert list(storage.iter_objects("outputs/nothing")) == []
    assert storage.usage() == (sum(map(len, blobs.values())), 4)
    assert storage.usage("outputs") == (20, 3)


def test_iter_objects_refuses_bad_prefixes(storage):
    for bad in ("../x", "outputs/", "/outputs", "outputs/../.."):
        with pytest.raises(InvalidKey):
            list(storage.iter_objects(bad))


def test_iter_older_than_agrees_with_the_listed_times(storage):
    _put_tree(storage)
    listed = list(storage.iter_objects(""))
    for o in listed:
        # Strictly older: an object written at the cutoff itself stays.
        older = {x.key for x in storage.iter_older_than("", o.mtime)}
        assert older == {x.key for x in listed if x.mtime < o.mtime}
    assert {x.key for x in storage.iter_older_than("", max(x.mtime for x in listed) + 1)} == {
        x.key for x in listed
    }


def test_local_writes_in_progress_are_not_listed(tmp_path, monkeypatch):
    s = LocalStorage(tmp_path / "media")
    key = s.new_key("outputs/job1", "output.mp4")
    seen: list[set[str]] = []
    fsync = os.fsync

    def listing_fsync(fd):  # the temporary file is written, not yet renamed into place
        seen.append({o.key for o in s.iter_objects("")})
        fsync(fd)

    monkeypatch.setattr(os, "fsync", listing_fsync)
    s.put_bytes(key, b"data")
    assert seen == [set()]
    assert {o.key for o in s.iter_objects("")} == {key}


def test_delete_one_and_by_prefix(storage):
    blobs = _put_tree(storage)
    job1 = sorted(k for k in blobs if k.startswith("outputs/job1/"))
    assert storage.delete(job1[0]) is True
    assert storage.delete(job1[0]) is False  # already gone
    assert not storage.exists(job1[0]) and storage.exists(job1[1])
    assert storage.delete_prefix("outputs/job1") == 1
    assert storage.delete_prefix("outputs/job1") == 0
    left = {o.key for o in storage.iter_objects("")}
    assert left == {k for k in blobs if not k.startswith("outputs/job1/")}  # job10 untouched
    with pytest.raises(InvalidKey):
        storage.delete_prefix("")  # there is no "delete everything"
    assert storage.delete("../outside") is False


def test_local_delete_leaves_no_empty_folders_but_keeps_the_top_level(tmp_path):
    s = LocalStorage(tmp_path / "media")
    a = s.put_bytes(s.new_key("outputs/job1", "output.mp4"), b"a")
    b = s.put_bytes(s.new_key("uploads", "ref.png"), b"b")
    s.delete_prefix("outputs/job1")
    s.delete(b)
    assert not (s.root / "outputs" / "job1").exists() and not (s.root / a).parent.exists()
    assert (s.root / "outputs").is_dir() and (s.root / "uploads").is_dir()
    assert list((s.root / "uploads").iterdir()) == []


def test_local_listing_does_not_follow_links_out_of_the_root(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"s")
    s = LocalStorage(tmp_path / "media")
    (s.root / "uploads").mkdir()
    (s.root / "uploads" / "link").symlink_to(outside, target_is_directory=True)
    assert list(s.iter_objects("")) == []
    assert s.delete_prefix("uploads") == 0
    assert (outside / "secret.bin").exists()


# S3 only ---------------------------------------------------------------------------------------
@pytest.fixture
def s3(request, tmp_path):
    return _s3(request, tmp_path)


def test_s3_keys_live_under_the_prefix_and_only_ours_are_listed(s3, moto_server):
    client = moto_server.client()
    key = s3.put_bytes(s3.new_key("outputs/j", "o.mp4"), b"ours")
    head = client.head_object(Bucket=s3.bucket, Key=f"{PREFIX}/{key}")
    assert head["ContentType"] == "video/mp4"  # what a presigned GET will serve it as
    # Objects beside the prefix, or under it with names that are not keys, are not ours.
    for stray in ("some/prefixed/x.bin", "other/x.bin", f"{PREFIX}/a//b.bin", f"{PREFIX}/dir/"):
        client.put_object(Bucket=s3.bucket, Key=stray, Body=b"s")
    assert [o.key for o in s3.iter_objects("")] == [key]
    assert s3.usage() == (4, 1)
    assert s3.delete_prefix("outputs") == 1
    assert client.head_object(Bucket=s3.bucket, Key="some/prefixed/x.bin")["ContentLength"] == 1


def test_s3_big_files_go_up_in_parts(request, tmp_path, moto_server, s3_bucket):
    from server.storage.s3 import S3Storage

    s3 = S3Storage(s3_bucket, PREFIX, endpoint_url=moto_server.endpoint, multipart_threshold=5 << 20)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 << 20))
    key = s3.put_file(s3.new_key("outputs/j", "big.bin"), src)
    head = moto_server.client().head_object(Bucket=s3_bucket, Key=f"{PREFIX}/{key}")
    assert re.fullmatch(r'"[0-9a-f]{32}-2"', head["ETag"])  # a multipart upload's ETag: 8 MiB + 3 MiB parts
    assert s3.read_bytes(key) == src.read_bytes()
    with pytest.raises(FileNotFoundError):
        s3.put_file(s3.new_key("outputs/j", "gone.bin"), tmp_path / "missing.bin")


def test_s3_delete_prefix_batches(s3, monkeypatch):
    from server.storage import s3 as s3_module

    monkeypatch.setattr(s3_module, "_DELETE_BATCH", 2)  # S3's 1000, made small enough to cross
    calls = []
    real = s3.client.delete_objects

    def counting(**kw):
        calls.append(len(kw["Delete"]["Objects"]))
        return real(**kw)

    monkeypatch.setattr(s3.client, "delete_objects", counting)
    keys = [s3.put_bytes(s3.new_key("outputs/many", f"{i}.bin"), b"x") for i in range(5)]
    keep = s3.put_bytes(s3.new_key("outputs/many2", "o.bin"), b"x")
    assert s3.delete_prefix("outputs/many") == 5
    assert calls == [2, 2, 1]
    assert not any(s3.exists(k) for k in keys) and s3.exists(keep)


def test_s3_presigned_urls_fetch_the_bytes_and_map_back_to_keys(request, moto_server, s3_bucket):
    import httpx

    from server.storage.s3 import S3Storage

    s3 = S3Storage(
        s3_bucket, PREFIX, endpoint_url=moto_server.endpoint, presigned_urls=True, presign_seconds=60
    )
    key = s3.put_bytes(s3.new_key("outputs/j", "résumé.png"), b"\x89PNG bytes")
    url = s3.url(BASE, key)
    assert (
        url.startswith(f"{moto_server.endpoint}/{s3_bucket}/{PREFIX}/outputs/j/") and "X-Amz-Signature" in url
    )
    assert "X-Amz-Expires=60" in url
    r = httpx.get(url, trust_env=False)
    assert r.status_code == 200 and r.content == b"\x89PNG bytes" and r.headers["content-type"] == "image/png"
    # Our own URLs, signed or not, expired or not, name the key; the API's /media/ URLs still do.
    assert s3.key_from_url(url, [BASE]) == key
    assert s3.key_from_url(url.split("?")[0], []) == key
    assert s3.key_from_url(f"{BASE}/media/{key}", [BASE]) == key
    host = moto_server.endpoint.split("//")[1]
    assert s3.key_from_url(f"http://{s3_bucket}.{host}/{PREFIX}/{key}", []) == key  # virtual-host style
    # Another bucket, another prefix, or a path that is no key: not ours.
    for foreign in (
        url.replace(f"/{s3_bucket}/", "/other-bucket/"),
        url.replace(f"/{PREFIX}/", "/some/other/"),
        f"{moto_server.endpoint}/{s3_bucket}/{PREFIX}/",
        f"{moto_server.endpoint}/{s3_bucket}/{PREFIX}/a/../../b",
        f"ftp://{host}/{s3_bucket}/{PREFIX}/{key}",
        "http://elsewhere.test/x.png",
    ):
        assert s3.key_from_url(foreign, [BASE]) is None, foreign
    # The expiry is presign_seconds (moto does not enforce it; S3 does), and the URL of an
    # expired signature still names the key: the query is not looked at.
    short = S3Storage(
        s3_bucket, PREFIX, endpoint_url=moto_server.endpoint, presigned_urls=True, presign_seconds=1
    )
    old = short.url(BASE, key)
    assert "X-Amz-Expires=1&" in old
    assert short.key_from_url(old.replace("X-Amz-Date=", "X-Amz-Date=1999"), []) == key


def test_s3_presigned_put_takes_the_signed_content_type(moto_server, s3_bucket):
    import httpx

    from server.storage.s3 import S3Storage

    api = S3Storage(s3_bucket, PREFIX, endpoint_url=moto_server.endpoint)
    assert api.presigned_put("uploads/t/a.png", "image/png", 60) is None  # "api" mode: through the API
    s3 = S3Storage(s3_bucket, PREFIX, endpoint_url=moto_server.endpoint, presigned_urls=True)
    key = s3.new_key("uploads", "a.png")
    put = s3.presigned_put(key, "image/png", 60)
    # The type is signed, so S3 refuses a PUT with another (moto does not check signatures).
    assert "X-Amz-SignedHeaders=content-type%3Bhost&" in put and "X-Amz-Expires=60&" in put
    assert (
        httpx.put(put, content=b"png!", headers={"Content-Type": "image/png"}, trust_env=False).status_code
        == 200
    )
    assert s3.read_bytes(key) == b"png!"
    assert (
        moto_server.client().head_object(Bucket=s3_bucket, Key=f"{PREFIX}/{key}")["ContentType"]
        == "image/png"
    )
    untyped = s3.presigned_put(s3.new_key("uploads", "b.bin"), "", 60)
    assert "X-Amz-SignedHeaders=host&" in untyped


def test_s3_unreachable_endpoint_is_storage_unavailable(tmp_path, monkeypatch):
    from server.storage import StorageUnavailable
    from server.storage.s3 import S3Storage
    from server.testing import free_port
    from tests.s3 import S3_ENV  # here: a plugin module must not be imported before pytest registers it

    for name, value in S3_ENV.items():  # credentials, so what fails is the connection
        monkeypatch.setenv(name, value)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    s3 = S3Storage("bucket", PREFIX, endpoint_url=dead, max_attempts=1)
    src = tmp_path / "f.bin"
    src.write_bytes(b"x")
    for call in (
        lambda: s3.put_bytes("outputs/j/t/o.mp4", b"x"),
        lambda: s3.put_file("outputs/j/t/o.mp4", src),
        lambda: s3.read_bytes("outputs/j/t/o.mp4"),
        lambda: s3.exists("outputs/j/t/o.mp4"),
        lambda: s3.stat("outputs/j/t/o.mp4"),
        lambda: list(s3.iter_objects("outputs")),
        lambda: s3.delete_prefix("outputs"),
    ):
        with pytest.raises(StorageUnavailable, match="media storage is unavailable right now") as err:
            call()
        assert err.value.status == 503 and err.value.headers == {"Retry-After": "5"}
        assert err.value.retryable  # a job that fails on it runs again
    with pytest.raises(RuntimeError, match="cannot be reached"):
        s3.check()


def test_s3_check_says_when_credentials_are_refused(moto_server, s3_bucket):
    from botocore.stub import Stubber

    from server.storage.s3 import S3Storage

    s3 = S3Storage(s3_bucket, PREFIX, endpoint_url=moto_server.endpoint)
    s3.check()  # the bucket is there
    # moto accepts any credentials; a stubbed answer stands in for a server that refuses them.
    with Stubber(s3.client) as stub:
        stub.add_client_error("head_bucket", service_error_code="403", http_status_code=403)
        with pytest.raises(RuntimeError, match="S3 refused our credentials"):
            s3.check()
