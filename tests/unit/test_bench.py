"""scripts/bench.py end to end on the CPU (`--tiny`): the files it leaves, every section measured
or skipped with a reason, and numbers that agree with each other and with pipelines/flops.py.
The optional parts (ours, fast mode, memory modes) are also run against stand-in modules, so
the harness around them is tested whether or not the real ones are in the tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines import flops

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ["14b-480p", "1.3b-480p", "fast-mode", "memory-modes", "14b-720p"]

FAKE_SPEED = """
from dataclasses import dataclass

import torch


@dataclass
class SpeedConfig:
    attention: str = "auto"
    compile: bool = False
    memory: str = "auto"


def apply_speed(pipe, config, device):
    if config.memory == "offload":  # a mode that breaks: recorded, and the run goes on
        raise RuntimeError("boom: this stand-in has no offload")
    if "fp8" in config.memory:
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    return {"attention": "native", "memory": config.memory, "compile": config.compile, "device": str(device)}
"""

# A cache that never skips: the fast run must then reproduce the exact run bit for bit.
FAKE_STEPCACHE = """
class Handle:
    def __init__(self, transformer, config):
        self.calls = {"enabled": 1, "disabled": 0}

    @property
    def stats(self):
        return dict(self.calls)

    def disable(self):
        self.calls["disabled"] += 1


def enable_step_cache(transformer, config=None):
    return Handle(transformer, config)
"""


def run_bench(tmp: Path, *args: str, pythonpath: Path | None = None, rc: int = 0) -> tuple[dict, str]:
    out = tmp / "out"
    # One thread: on a shared 2-core runner, spinning OpenMP threads cost more than they give.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--tiny", "--threads", "1", "--out", str(out), *args],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    md = (out / "bench.md").read_text()
    assert md.strip() and md in proc.stdout  # the table is printed too
    return doc, md


def check_consistent(doc: dict) -> None:
    """Every measured number positive, and the derived ones recomputed here agree."""
    meta = doc["meta"]
    matmul = meta["matmul"]["tflops"]
    assert matmul > 0
    for sec in doc["sections"]:
        assert sec["status"] in ("measured", "skipped"), (sec["id"], sec.get("reason"), sec.get("traceback"))
        if sec["status"] == "skipped":
            assert sec["reason"], sec["id"]
        for v in sec["variants"]:
            assert v["status"] in ("measured", "skipped"), (sec["id"], v)
            if v["status"] == "skipped":
                assert v["reason"], (sec["id"], v["name"])
                continue
            assert v["s_per_step"] > 0
            assert all(t > 0 for t in v.get("step_times", [1]))
            model_cfg = doc_model_config(sec, v)
            shape = flops.TransformerShape.from_config(model_cfg)
            job = flops.job_flops(shape, width=sec["width"], height=sec["height"], frames=sec["frames"],
                                  steps=meta["job"]["steps"], cfg=meta["job"]["cfg"],
                                  vae=flops.VaeShape(base_dim=3, dim_mult=(1, 1, 1, 1), num_res_blocks=1))  # fmt: skip
            tflops = job["step_flops"] / v["s_per_step"] / 1e12
            assert v["tflops"] == pytest.approx(tflops, rel=1e-9)
            assert v["pct_spec"] == pytest.approx(100 * tflops / flops.H100_BF16_DENSE_TFLOPS, rel=1e-9)
            assert v["pct_matmul"] == pytest.approx(100 * tflops / matmul, rel=1e-9)
            if "stages" in v:
                st = v["stages"]
                for k in ("text_encode_s", "vae_encode_s", "vae_decode_s", "to_host_s", "mp4_encode_s"):
                    assert st[k] > 0, k
                job_s = (meta["job"]["steps"] * v["s_per_step"] + st["text_encode_s"] + 2 * st["vae_encode_s"]
                         + st["vae_decode_s"] + st["to_host_s"] + st["mp4_encode_s"])  # fmt: skip
                assert v["s_per_job"] == pytest.approx(job_s, rel=1e-9)


def doc_model_config(sec: dict, v: dict) -> dict:
    if v.get("model", sec["model"]) == sec["model"]:
        return sec["transformer_config"]
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    return bench.TINY.transformers[v["model"]]


def test_tiny_run_leaves_a_complete_consistent_report(tmp_path):
    doc, md = run_bench(tmp_path)
    assert [s["id"] for s in doc["sections"]] == SECTIONS
    check_consistent(doc)
    first = doc["sections"][0]
    assert first["status"] == "measured"
    assert first["tokens"] == flops.tokens(48, 32, 81)
    stock = next(v for v in first["variants"] if v["name"] == "stock")
    assert stock["status"] == "measured" and len(stock["step_times"]) == doc["meta"]["steps_measured"]
    assert {v["name"] for v in first["variants"]} >= {"stock", "ours"}  # ours: measured or why not
    for i, sec in enumerate(doc["sections"], 1):
        assert f"## {i}. {sec['title']}" in md
    assert "| stock |" in md


def stand_ins(tmp_path: Path) -> Path:
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    (fakes / "fake_speed.py").write_text(textwrap.dedent(FAKE_SPEED))
    (fakes / "fake_stepcache.py").write_text(textwrap.dedent(FAKE_STEPCACHE))
    return fakes


def test_optional_parts_against_stand_ins(tmp_path):
    fakes = stand_ins(tmp_path)
    doc, md = run_bench(tmp_path, "--sections", "1,3,4", "--fast-steps", "4", "--speed-module", "fake_speed",
                        "--stepcache-module", "fake_stepcache", pythonpath=fakes, rc=1)  # fmt: skip
    # rc 1: the failing offload mode; the rest of the report is whole.
    offload = next(v for s in doc["sections"] for v in s["variants"] if v["name"] == "offload")
    assert offload["status"] == "failed" and "RuntimeError: boom" in offload["reason"]
    offload["status"], offload["reason"] = "skipped", "failed as planned"  # for check_consistent
    check_consistent(doc)
    sec = {s["id"]: s for s in doc["sections"]}
    ours = next(v for v in sec["14b-480p"]["variants"] if v["name"] == "ours")
    assert ours["status"] == "measured"
    assert ours["speed_report"]["compile"] is False and "ours" in sec["14b-480p"]["ratios"]
    assert ours["stages"]["text_encode_s"] > 0
    fast = sec["fast-mode"]
    assert fast["status"] == "measured", fast.get("reason")
    (v,) = fast["variants"]
    # The stand-in never skips: same seed, same steps, so the outputs are identical.
    assert v["identical"] is True and v["psnr_db"] is None
    assert v["computed_forwards"] == v["forwards"] == 4 * 2
    assert v["cache_stats"] == {"enabled": 1, "disabled": 0}
    assert v["exact_s"] > 0 and v["fast_s"] > 0 and v["speedup"] > 0
    mem = sec["memory-modes"]
    assert mem["status"] == "measured"
    assert {v["name"]: v["status"] for v in mem["variants"]} == {"fp8": "measured", "offload": "skipped"}
    assert mem["variants"][0]["speed_report"]["memory"] == "fp8"
    for skipped in ("1.3b-480p", "14b-720p"):
        assert sec[skipped]["status"] == "skipped" and "--sections" in sec[skipped]["reason"]
    assert "identical True" in md
    assert "| offload | failed: RuntimeError: boom" in md


def test_a_short_budget_skips_with_reasons(tmp_path):
    doc, md = run_bench(tmp_path, "--budget-s", "0.5", "--ours", "none")
    assert [s["status"] for s in doc["sections"]] == ["skipped"] * 5
    assert all("budget" in s["reason"] or "not available" in s["reason"] for s in doc["sections"])
    assert "**skipped**" in md
