"""The real loading code (`from_pretrained` on a local folder), tested by saving the tiny random
model to a temp folder and loading it back through the production path."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub

import shutil
import socket
from pathlib import Path

import pytest
import torch

from pipelines.loader import ModelNotAvailable, load_pipeline, load_pipeline_from_dir
from pipelines.manifest import MANIFEST_NAME, build_manifest, write_manifest
from pipelines.tiny import build_tiny_pipeline
from pipelines.weights import fetch_command, load_catalog

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(the built pipeline, the folder it was saved to)."""
    pipe = build_tiny_pipeline(seed=0)
    folder = tmp_path_factory.mktemp("saved") / "tiny-saved"
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test, HF_HUB_OFFLINE or not."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _catalog_with(tmp_path: Path, folder_name: str) -> dict:
    toml = tmp_path / "weights.toml"
    toml.write_text(
        f"""
[models.local-test]
kind = "diffusers"
repo_id = "example/not-on-the-hub"
revision = "main"
license = "Apache-2.0"
folder = "{folder_name}"
required = ["model_index.json", "scheduler/", "text_encoder/", "tokenizer/", "transformer/", "vae/"]
allow_patterns = ["*"]

[models.local-test.dtypes]
transformer = "bfloat16"
text_encoder = "bfloat16"
vae = "float32"
"""
    )
    return load_catalog(toml)


def _assert_dtypes_and_weights(orig, pipe):
    assert pipe.transformer.dtype == BF16
    assert pipe.text_encoder.dtype == BF16
    assert pipe.vae.dtype == FP32
    assert all(p.dtype == FP32 for p in pipe.vae.parameters())
    assert all(p.dtype == BF16 for p in pipe.text_encoder.parameters())
    # Weights survived the round trip: each tensor equals the original cast to its loaded dtype
    # (the transformer keeps a few modules in fp32 on purpose).
    for comp in ("transformer", "text_encoder", "vae"):
        a = getattr(orig, comp).state_dict()
        b = getattr(pipe, comp).state_dict()
        assert a.keys() == b.keys(), comp
        keys = sorted(a)
        for k in keys[:: max(1, len(keys) // 6)] + keys[-1:]:
            assert torch.equal(a[k].to(b[k].dtype), b[k]), f"{comp}.{k}"
    assert pipe.tokenizer("a cat on the beach").input_ids == orig.tokenizer("a cat on the beach").input_ids
    assert pipe.scheduler.config.flow_shift == orig.scheduler.config.flow_shift


def test_load_from_dir_round_trip(saved, no_network):
    orig, folder = saved
    assert not (folder / MANIFEST_NAME).exists()  # save_pretrained folders load without one
    pipe, info = load_pipeline_from_dir(folder)
    _assert_dtypes_and_weights(orig, pipe)
    assert info.kind == "pretrained"
    assert info.dtypes == {"transformer": "bfloat16", "text_encoder": "bfloat16", "vae": "float32"}
    assert info.source == str(folder.resolve())
    assert info.render_downscale == 1


def test_load_catalog_entry(saved, tmp_path, no_network):
    orig, folder = saved
    root = tmp_path / "weights"
    shutil.copytree(folder, root / "local-copy")
    write_manifest(root / "local-copy", build_manifest(root / "local-copy", revision="abc"))
    catalog = _catalog_with(tmp_path, "local-copy")
    pipe, info = load_pipeline("local-test", weights_root=root, catalog=catalog)
    _assert_dtypes_and_weights(orig, pipe)
    assert (info.name, info.kind, info.revision) == ("local-test", "pretrained", "abc")
    assert info.repo_id == "example/not-on-the-hub"


def test_catalog_entry_without_manifest_is_incomplete(saved, tmp_path):
    _, folder = saved
    root = tmp_path / "weights"
    shutil.copytree(folder, root / "local-copy")
    with pytest.raises(ModelNotAvailable) as e:
        load_pipeline("local-test", weights_root=root, catalog=_catalog_with(tmp_path, "local-copy"))
    assert MANIFEST_NAME in str(e.value)
    assert e.value.fetch_command == fetch_command("local-test", root)


def test_missing_folder_names_fetch_command(tmp_path):
    root = tmp_path / "empty-root"
    with pytest.raises(ModelNotAvailable) as e:
        load_pipeline("wan2.1-vace-14b", weights_root=root)
    msg = str(e.value)
    expected = f"python scripts/fetch_weights.py wan2.1-vace-14b --weights-dir {root}"
    assert expected in msg
    assert e.value.fetch_command == expected
    assert "folder missing" in msg


def test_incomplete_folder_names_missing_pieces(saved, tmp_path):
    _, folder = saved
    root = tmp_path / "weights"
    copy = root / "local-copy"
    shutil.copytree(folder, copy)
    write_manifest(copy, build_manifest(copy))
    shutil.rmtree(copy / "transformer")

    with pytest.raises(ModelNotAvailable) as e:
        load_pipeline_from_dir(copy)
    assert "transformer/" in str(e.value)
    assert e.value.missing[0].startswith("transformer/")

    with pytest.raises(ModelNotAvailable) as e:
        load_pipeline("local-test", weights_root=root, catalog=_catalog_with(tmp_path, "local-copy"))
    msg = str(e.value)
    assert "transformer/ (folder missing)" in msg
    assert "transformer/diffusion_pytorch_model.safetensors" in msg  # listed in the manifest
    assert fetch_command("local-test", root) in msg


def test_truncated_file_is_incomplete(saved, tmp_path):
    _, folder = saved
    root = tmp_path / "weights"
    copy = root / "local-copy"
    shutil.copytree(folder, copy)
    write_manifest(copy, build_manifest(copy))
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelNotAvailable, match="truncated"):
        load_pipeline("local-test", weights_root=root, catalog=_catalog_with(tmp_path, "local-copy"))


def test_tiny_needs_no_files(tmp_path, no_network):
    pipe, info = load_pipeline("tiny", weights_root=tmp_path / "nothing-here")
    assert info.kind == "random"
    assert info.render_downscale == 8
    assert any("scales the frames back up" in n for n in info.notes)
    assert type(pipe).__name__ == "WanVACEPipeline"
    assert not (tmp_path / "nothing-here").exists()


def test_unknown_model(tmp_path):
    with pytest.raises(ModelNotAvailable, match="known models: .*tiny"):
        load_pipeline("wan-9000", weights_root=tmp_path)
