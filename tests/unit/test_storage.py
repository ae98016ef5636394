"""The storage contract (server/storage/base.py), run against every backend (today: local).
A new backend joins by adding its factory to BACKENDS."""

import os
import threading

import pytest

from server.settings import Settings
from server.storage import InvalidKey, LocalStorage, Storage, open_storage

BASE = "http://vace.test:8000"


def _local(tmp_path):
    return LocalStorage(tmp_path / "media")


BACKENDS = {"local": _local}


@pytest.fixture(params=sorted(BACKENDS))
def storage(request, tmp_path) -> Storage:
    return BACKENDS[request.param](tmp_path)


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
        storage.local_path(key)
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
    with pytest.raises(KeyError):
        storage.local_path(key)
    # A "folder" of stored keys is not itself a stored object.
    storage.put_bytes(key, b"x")
    prefix = key.rsplit("/", 1)[0]
    assert not storage.exists(prefix)
    with pytest.raises(KeyError):
        storage.read_bytes(prefix)


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
    path = storage.local_path(key)
    with open(path, "rb") as f:
        f.seek(2)
        assert f.read(3) == b"nge"


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
    with pytest.raises(NotImplementedError, match="WAN_VACE_STORAGE_URL"):
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
