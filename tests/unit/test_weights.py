"""weights.toml, the completeness checks, checksum verification and the fetch script — offline:
the Hub is replaced by a fake folder and fake file metadata."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines.manifest import (
    MANIFEST_NAME,
    RemoteFile,
    build_manifest,
    read_manifest,
    sha256_file,
    verify_manifest,
    verify_remote_files,
    write_manifest,
)
from pipelines.weights import (
    CatalogError,
    check_complete,
    default_weights_root,
    fetch_command,
    load_catalog,
)

REPO = Path(__file__).resolve().parents[2]  # the repository
SCRIPT = REPO / "scripts" / "fetch_weights.py"
REAL = ("wan2.1-vace-14b", "wan2.1-vace-1.3b")
LAYOUT = {"model_index.json", "scheduler/", "text_encoder/", "tokenizer/", "transformer/", "vae/"}


def _fake_model_folder(folder: Path) -> dict[str, bytes]:
    files = {
        "model_index.json": b'{"_class_name": "WanVACEPipeline"}',
        "scheduler/scheduler_config.json": b"{}",
        "text_encoder/config.json": b"{}",
        "text_encoder/model.safetensors": b"\x01" * 3000,
        "tokenizer/tokenizer.json": b"{}",
        "transformer/config.json": b"{}",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors": os.urandom(5000),
        "transformer/diffusion_pytorch_model-00002-of-00002.safetensors": os.urandom(4000),
        "vae/config.json": b"{}",
        "vae/diffusion_pytorch_model.safetensors": os.urandom(2000),
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- catalog --------------------------------------------------------------------------------


def test_catalog_parses():
    cat = load_catalog()
    assert set(REAL) | {"tiny"} <= set(cat)
    assert cat["tiny"].kind == "random" and not cat["tiny"].needs_files
    assert cat["tiny"].render_downscale > 1
    assert check_complete(cat["tiny"], "/nonexistent") == []


@pytest.mark.parametrize("name", REAL)
def test_real_entries_are_fully_described(name):
    e = load_catalog()[name]
    assert e.kind == "diffusers"
    assert e.repo_id.startswith("Wan-AI/Wan2.1-VACE-") and e.repo_id.endswith("-diffusers")
    assert e.revision and e.license == "Apache-2.0"
    assert e.dtypes == {"transformer": "bfloat16", "text_encoder": "bfloat16", "vae": "float32"}
    assert LAYOUT <= set(e.required)
    assert e.allow_patterns and e.approx_size_gb and e.approx_size_gb > 1
    assert e.local_dir("/w") == Path("/w") / e.folder
    assert not Path(e.folder).is_absolute()


def test_14b_is_pinned_to_a_commit():
    e = load_catalog()["wan2.1-vace-14b"]
    assert e.pinned and len(e.revision) == 40


def test_catalog_rejects_typos_and_gaps(tmp_path):
    bad = tmp_path / "w.toml"
    bad.write_text('[models.x]\nkind = "random"\nrender_downscal = 8\n')
    with pytest.raises(CatalogError, match="unknown keys"):
        load_catalog(bad)
    bad.write_text('[models.x]\nkind = "diffusers"\nrepo_id = "a/b"\n')
    with pytest.raises(CatalogError, match="revision is required"):
        load_catalog(bad)
    with pytest.raises(CatalogError, match="not found"):
        load_catalog(tmp_path / "absent.toml")


def test_fetch_command_and_default_root():
    e = load_catalog()["wan2.1-vace-14b"]
    assert (
        fetch_command(e, "/srv/w") == "python scripts/fetch_weights.py wan2.1-vace-14b --weights-dir /srv/w"
    )
    assert "'/my weights'" in fetch_command(e, "/my weights")
    assert default_weights_root({"WAN_VACE_WEIGHTS_DIR": "/a"}) == Path("/a")
    assert default_weights_root({"WAN_VACE_DATA_DIR": "/d"}) == Path("/d/weights")


# ---- manifest and checksums -----------------------------------------------------------------


def test_manifest_verification_detects_corruption(tmp_path):
    _fake_model_folder(tmp_path)
    (tmp_path / ".cache" / "huggingface").mkdir(parents=True)  # snapshot_download's, ignored
    (tmp_path / ".cache" / "huggingface" / "x.metadata").write_text("x")
    write_manifest(tmp_path, build_manifest(tmp_path, model="m", revision="r"))
    manifest = read_manifest(tmp_path)
    assert not any(k.startswith(".cache") for k in manifest["files"])
    assert verify_manifest(tmp_path) == []

    shard = tmp_path / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors"
    _flip_byte(shard)  # same size: only the hash can tell
    problems = verify_manifest(tmp_path)
    assert len(problems) == 1 and shard.name in problems[0] and "corrupted" in problems[0]

    (tmp_path / "vae" / "config.json").unlink()
    assert any("vae/config.json: file missing" in p for p in verify_manifest(tmp_path))

    (tmp_path / MANIFEST_NAME).unlink()
    assert "missing" in verify_manifest(tmp_path)[0]


def test_verify_against_hub_metadata(tmp_path):
    files = _fake_model_folder(tmp_path)

    def git(b: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest()

    remote = [
        RemoteFile(rel, len(b), sha256=hashlib.sha256(b).hexdigest())
        if rel.endswith(".safetensors")
        else RemoteFile(rel, len(b), git_sha1=git(b))
        for rel, b in files.items()
    ]
    problems, ok = verify_remote_files(tmp_path, remote)
    assert problems == [] and set(ok) == set(files)
    assert ok["vae/config.json"]["sha256"] == sha256_file(tmp_path / "vae/config.json")

    _flip_byte(tmp_path / "vae/diffusion_pytorch_model.safetensors")
    (tmp_path / "model_index.json").write_bytes(b'{"_class_name": "WanVACEPipelinX"}')
    problems, ok = verify_remote_files(tmp_path, remote)
    assert len(problems) == 2 and all("corrupted" in p for p in problems)
    assert "vae/diffusion_pytorch_model.safetensors" not in ok


def test_check_complete_requires_manifest_and_pinned_revision(tmp_path):
    e = load_catalog()["wan2.1-vace-14b"]
    folder = e.local_dir(tmp_path)
    folder.mkdir(parents=True)
    _fake_model_folder(folder)
    assert any(MANIFEST_NAME in m for m in check_complete(e, tmp_path))
    write_manifest(folder, build_manifest(folder, revision="0" * 40))
    assert any("revision" in m for m in check_complete(e, tmp_path))
    write_manifest(folder, build_manifest(folder, revision=e.revision))
    assert check_complete(e, tmp_path) == []


# ---- the fetch script -----------------------------------------------------------------------


def _load_script():
    spec = importlib.util.spec_from_file_location("fetch_weights", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A fake Hub: model_info from a source folder's files, downloads copied from it."""
    fw = _load_script()
    src = tmp_path / "hub-source"
    src.mkdir()
    files = _fake_model_folder(src)
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n"
    (src / "README.md").write_bytes(files["README.md"])
    files["assets/ignored.png"] = b"png"  # not matched by allow_patterns
    (src / "assets").mkdir()
    (src / "assets/ignored.png").write_bytes(b"png")
    sha = "f" * 40

    def sibling(rel, data):
        if rel.endswith((".safetensors", ".png")):
            lfs = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointer_size": 1}
            return SimpleNamespace(rfilename=rel, size=len(data), blob_id="x", lfs=lfs)
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return SimpleNamespace(rfilename=rel, size=len(data), blob_id=blob, lfs=None)

    calls = SimpleNamespace(info=[], download=[], corrupt_next=0)

    def model_info(repo_id, revision):
        calls.info.append((repo_id, revision))
        return SimpleNamespace(sha=sha, siblings=[sibling(r, d) for r, d in files.items()])

    def download(*, repo_id, revision, local_dir, allow_patterns):
        from huggingface_hub.utils import filter_repo_objects

        calls.download.append((repo_id, revision, allow_patterns))
        for rel in filter_repo_objects(list(files), allow_patterns=allow_patterns):
            dst = Path(local_dir) / rel
            if dst.is_file() and dst.stat().st_size == len(files[rel]):
                continue  # "resume": already there
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(files[rel])
        if calls.corrupt_next:
            calls.corrupt_next -= 1
            _flip_byte(Path(local_dir) / "vae/diffusion_pytorch_model.safetensors")
        return str(local_dir)

    monkeypatch.setattr(fw, "hub_model_info", model_info)
    monkeypatch.setattr(fw, "hub_snapshot_download", download)
    return fw, calls, sha


def test_fetch_verifies_and_writes_manifest(fake_hub, tmp_path, capsys):
    fw, calls, sha = fake_hub
    root = tmp_path / "weights"
    assert fw.main(["wan2.1-vace-1.3b", "--weights-dir", str(root)]) == 0
    e = load_catalog()["wan2.1-vace-1.3b"]
    folder = e.local_dir(root)
    manifest = read_manifest(folder)
    assert manifest["revision"] == sha and manifest["repo_id"] == e.repo_id
    assert "assets/ignored.png" not in manifest["files"] and "README.md" in manifest["files"]
    assert calls.info == [(e.repo_id, e.revision)]
    assert calls.download[0][1] == sha  # downloads the resolved commit, not the branch
    assert check_complete(e, root) == []
    out = capsys.readouterr().out
    assert "ok:" in out and f'revision = "{sha}"' in out  # unpinned: tells how to pin


def test_fetch_redownloads_a_corrupted_file_once(fake_hub, tmp_path):
    fw, calls, _ = fake_hub
    calls.corrupt_next = 1
    root = tmp_path / "weights"
    assert fw.main(["wan2.1-vace-1.3b", "--weights-dir", str(root)]) == 0
    assert len(calls.download) == 2


def test_fetch_fails_without_manifest_when_corruption_persists(fake_hub, tmp_path, capsys):
    fw, calls, _ = fake_hub
    calls.corrupt_next = 2
    root = tmp_path / "weights"
    assert fw.main(["wan2.1-vace-1.3b", "--weights-dir", str(root)]) == 1
    folder = load_catalog()["wan2.1-vace-1.3b"].local_dir(root)
    assert not (folder / MANIFEST_NAME).exists()
    assert "vae/diffusion_pytorch_model.safetensors" in capsys.readouterr().err


def test_fetch_reports_hub_errors(fake_hub, tmp_path, monkeypatch, capsys):
    fw, _, _ = fake_hub

    def unreachable(repo_id, revision):
        raise OSError("offline")

    monkeypatch.setattr(fw, "hub_model_info", unreachable)
    assert fw.main(["wan2.1-vace-14b", "--weights-dir", str(tmp_path)]) == 1
    assert "could not read Wan-AI/Wan2.1-VACE-14B-diffusers" in capsys.readouterr().err


def _run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )


def test_verify_only_exit_codes(tmp_path):
    name = "wan2.1-vace-1.3b"
    root = tmp_path / "weights"
    folder = load_catalog()[name].local_dir(root)

    r = _run_script(name, "--weights-dir", str(root), "--verify-only")
    assert r.returncode == 1
    assert fetch_command(name, root) in r.stderr and "folder missing" in r.stderr

    folder.mkdir(parents=True)
    _fake_model_folder(folder)
    r = _run_script(name, "--weights-dir", str(root), "--verify-only")
    assert r.returncode == 1 and MANIFEST_NAME in r.stderr

    write_manifest(folder, build_manifest(folder, model=name))
    r = _run_script(name, "--weights-dir", str(root), "--verify-only")
    assert r.returncode == 0, r.stderr
    assert "ok:" in r.stdout

    _flip_byte(folder / "text_encoder/model.safetensors")
    r = _run_script(name, "--weights-dir", str(root), "--verify-only")
    assert r.returncode == 1
    assert "text_encoder/model.safetensors" in r.stderr and "corrupted" in r.stderr

    r = _run_script("no-such-model", "--weights-dir", str(root), "--verify-only")
    assert r.returncode == 2 and "known models" in r.stderr

    r = _run_script("tiny", "--verify-only")
    assert r.returncode == 0 and "nothing to fetch" in r.stdout


def test_manifest_file_is_valid_json(tmp_path):
    _fake_model_folder(tmp_path)
    path = write_manifest(tmp_path, build_manifest(tmp_path))
    data = json.loads(path.read_text())
    assert data["format"] == 1
    for meta in data["files"].values():
        assert set(meta) == {"sha256", "size"} and len(meta["sha256"]) == 64


def test_weights_resolver_for_preprocessors_names_the_fetch_command(tmp_path):
    from pipelines.weights import ModelNotAvailable, UnknownModel, weights_resolver

    resolve = weights_resolver(tmp_path)
    with pytest.raises(ModelNotAvailable) as e:
        resolve("midas-dpt-hybrid")  # known, not fetched into tmp_path
    assert "scripts/fetch_weights.py midas-dpt-hybrid" in str(e.value)
    assert str(tmp_path / "preprocessors/VACE-Annotators-depth") in str(e.value)
    with pytest.raises(UnknownModel):
        resolve("no-such-model")
    with pytest.raises(UnknownModel):
        resolve("wan2.1-vace-14b")  # a model, not a preprocessor's weights
    with pytest.raises(ModelNotAvailable, match="non-commercial"):
        resolve("antelopev2")  # placed by the user: says how to get it


def test_a_preprocessor_entry_is_fetched_and_resolved_like_a_model(tmp_path, monkeypatch, capsys):
    from pipelines.weights import weights_resolver

    fw = _load_script()
    data = b"raft weights"
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    repos = []

    def model_info(repo_id, revision):
        repos.append(repo_id)
        sib = SimpleNamespace(rfilename="flow/raft-things.pth", size=len(data), blob_id=blob, lfs=None)
        return SimpleNamespace(sha="e" * 40, siblings=[sib])

    def download(*, repo_id, revision, local_dir, allow_patterns):
        assert allow_patterns == ["flow/raft-things.pth"]
        (Path(local_dir) / "flow").mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "flow/raft-things.pth").write_bytes(data)

    monkeypatch.setattr(fw, "hub_model_info", model_info)
    monkeypatch.setattr(fw, "hub_snapshot_download", download)
    root = tmp_path / "weights"
    resolve = weights_resolver(root)
    with pytest.raises(Exception, match="fetch_weights.py raft"):
        resolve("raft")
    assert fw.main(["raft", "--weights-dir", str(root)]) == 0
    assert repos == ["ali-vilab/VACE-Annotators"]
    assert "for flow; licence BSD-3-Clause" in capsys.readouterr().out
    folder = resolve("raft")  # now complete (files and manifest): the flow/ sub-folder
    assert folder == root / "preprocessors/VACE-Annotators-flow/flow"
    assert (folder / "raft-things.pth").read_bytes() == data
