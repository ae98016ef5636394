"""The GPUs of a host, found without torch (CUDA_VISIBLE_DEVICES, else a real `nvidia-smi -L`
run: here a fake script on a temporary PATH), and the worker plan made from them: slots, each
with the CUDA_VISIBLE_DEVICES its worker starts with; leftovers, errors, the CLI's usage errors
and `wan-vace settings`."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from server import cli, gpus
from server.gpus import Detected, Gpu, GpuPlanError, detect, parse_visible_devices, plan
from server.settings import Settings

UUIDS = [f"GPU-{i}d3c0e9a-1111-2222-3333-44445555666{i}" for i in range(8)]


def fake_nvidia_smi(
    tmp_path: Path, count: int, *, name: str = "NVIDIA H200", body: str | None = None
) -> Path:
    """A directory holding an `nvidia-smi` that prints `count` GPUs for `-L` as the real one
    does (a MIG device under the first, which is not a GPU of its own), or runs `body`."""
    bin_dir = tmp_path / f"bin-{count}"
    bin_dir.mkdir(exist_ok=True)
    lines = [f"GPU {i}: {name} (UUID: {UUIDS[i]})" for i in range(count)]
    if count:
        lines.insert(1, "  MIG 1g.18gb     Device  0: (UUID: MIG-8f2a6c1e-aaaa-bbbb-cccc-ddddeeeeffff)")
    script = body or ('[ "$1" = "-L" ] || exit 2\ncat <<"END"\n' + "\n".join(lines) + "\nEND\n")
    exe = bin_dir / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def host(n: int, source: str = "nvidia-smi") -> Detected:
    ids = [str(i) for i in range(n)] if source == "nvidia-smi" else UUIDS[:n]
    return Detected(tuple(Gpu(i, ids[i], "NVIDIA H200", UUIDS[i]) for i in range(n)), source)


def settings(**kw) -> Settings:
    return Settings(**{"workers": None, "gpus": None, "gpus_per_job": 1, "device": "auto", **kw})


def visible(p: gpus.Plan) -> list[str | None]:
    return [s.cuda_visible_devices for s in p.slots]


# Detection -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("0,1", ["0", "1"]),
        (" 2, 3 ", ["2", "3"]),
        ("07", ["7"]),
        (f"{UUIDS[0]},{UUIDS[1]}", UUIDS[:2]),
        ("GPU-5d3c", ["GPU-5d3c"]),  # a UUID prefix, as CUDA accepts
        ("MIG-8f2a6c1e-aaaa-bbbb-cccc-ddddeeeeffff", ["MIG-8f2a6c1e-aaaa-bbbb-cccc-ddddeeeeffff"]),
        ("", []),
        ("-1", []),
        ("0,-1,1", ["0"]),  # CUDA stops at the first invalid entry
        ("1,,2", ["1"]),
        ("0,cpu,1", ["0"]),
        ("NoDevFiles", []),
    ],
)
def test_cuda_visible_devices_is_read_as_cuda_reads_it(value, names):
    assert parse_visible_devices(value) == names


def test_nvidia_smi_lists_the_gpus_when_cuda_visible_devices_is_unset(tmp_path):
    d = detect({"PATH": str(fake_nvidia_smi(tmp_path, 4))})
    assert d.source == "nvidia-smi" and d.note == ""
    assert [(g.index, g.id, g.name, g.uuid) for g in d.gpus] == [
        (i, str(i), "NVIDIA H200", UUIDS[i]) for i in range(4)
    ]  # the MIG line is no GPU


def test_cuda_visible_devices_wins_over_nvidia_smi_which_only_names_them(tmp_path):
    path = str(fake_nvidia_smi(tmp_path, 4))
    d = detect({"PATH": path, "CUDA_VISIBLE_DEVICES": f"2,{UUIDS[3][:12]}"})
    assert d.source == "CUDA_VISIBLE_DEVICES"
    assert [(g.index, g.id, g.name) for g in d.gpus] == [
        (0, "2", "NVIDIA H200"),
        (1, UUIDS[3][:12], "NVIDIA H200"),
    ]
    for hidden in ("", "-1"):
        d = detect({"PATH": path, "CUDA_VISIBLE_DEVICES": hidden})
        assert d.gpus == () and "hides every GPU" in d.note
    # Without nvidia-smi the list is the same, unnamed.
    d = detect({"PATH": str(tmp_path / "nowhere"), "CUDA_VISIBLE_DEVICES": "1,0"})
    assert [(g.index, g.id, g.name) for g in d.gpus] == [(0, "1", ""), (1, "0", "")]


def test_no_nvidia_smi_a_failing_one_or_a_hanging_one_means_no_gpu(tmp_path):
    d = detect({"PATH": str(tmp_path / "nowhere")})
    assert (d.gpus, d.source, d.note) == ((), "none", "nvidia-smi not found")
    failing = fake_nvidia_smi(tmp_path, 0, body="echo 'NVIDIA-SMI has failed because it couldn'\"'\"'t "
                              "communicate with the NVIDIA driver.'\nexit 9\n")  # fmt: skip
    d = detect({"PATH": str(failing)})
    assert d.gpus == () and d.note.startswith("nvidia-smi failed (NVIDIA-SMI has failed because")
    hanging = tmp_path / "hang"
    hanging.mkdir()
    exe = hanging / "nvidia-smi"
    exe.write_text("#!/bin/sh\nexec sleep 30\n")
    exe.chmod(0o755)
    gpus_found, note = gpus.nvidia_smi_gpus(str(exe), timeout=0.3)
    assert gpus_found == [] and note == "nvidia-smi did not answer within 0.3 s"


# The plan ----------------------------------------------------------------------------------------
def test_one_worker_per_gpu_by_default_in_the_order_nvidia_smi_shows():
    p = plan(settings(), host(2), environ={})
    assert visible(p) == ["0", "1"] and p.uses_gpus and p.warnings == ()
    # nvidia-smi counts in PCI-bus order; CUDA's default order may differ on a mixed host.
    assert [dict(s.env) for s in p.slots] == [
        {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
        {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
    ]
    assert p.slots[1].info() == {"gpus": "1", "gpu_names": ["NVIDIA H200"]}
    assert p.describe() == "2 workers: worker 1 on GPU 0 (NVIDIA H200); worker 2 on GPU 1 (NVIDIA H200)"
    # An order the operator chose is kept.
    assert (
        "CUDA_DEVICE_ORDER"
        not in plan(settings(), host(2), environ={"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}).slots[0].env
    )


def test_groups_of_gpus_per_job_and_leftovers_warned_and_unused():
    p = plan(settings(gpus_per_job=2), host(4), environ={})
    assert visible(p) == ["0,1", "2,3"]
    assert p.describe().startswith("2 workers, 2 GPUs per job: worker 1 on GPU 0 (NVIDIA H200), GPU 1")
    p = plan(settings(gpus_per_job=2), host(5), environ={})
    assert visible(p) == ["0,1", "2,3"]
    assert p.warnings == (
        "GPU 4 (NVIDIA H200) left unused: 5 GPUs do not divide into groups of 2 (gpus_per_job)",
    )


def test_explicit_gpus_pick_by_cuda_index_and_keep_what_cuda_visible_devices_named():
    assert visible(plan(settings(gpus=[3, 1]), host(4), environ={})) == ["3", "1"]
    # Under CUDA_VISIBLE_DEVICES the indices are this process's: a child gets the parent's names.
    inherited = Detected(tuple(Gpu(i, d) for i, d in enumerate(["4", "6", UUIDS[7]])), "CUDA_VISIBLE_DEVICES")
    p = plan(settings(gpus=[1, 2], gpus_per_job=2), inherited, environ={})
    assert [dict(s.env) for s in p.slots] == [{"CUDA_VISIBLE_DEVICES": f"6,{UUIDS[7]}"}]


def test_explicit_workers_win_and_take_the_groups_in_turn():
    assert visible(plan(settings(workers=3, gpus_per_job=2), host(4), environ={})) == ["0,1", "2,3", "0,1"]
    assert visible(plan(settings(workers=1), host(4), environ={})) == ["0"]
    api_only = plan(settings(workers=0), host(4), environ={})
    assert api_only.count == 0 and api_only.describe() == "no local worker (API only: workers=0)"


def test_no_gpu_or_the_cpu_device_means_one_worker_and_no_environment_change():
    for p in (
        plan(settings(), Detected((), "none", "nvidia-smi not found")),
        plan(settings(device="cpu"), host(4)),
    ):
        assert p.count == 1 and not p.uses_gpus and dict(p.slots[0].env) == {} and p.slots[0].info() == {}
    assert plan(settings(), Detected((), "none", "nvidia-smi not found")).describe() == (
        "1 worker, no GPU assigned (nvidia-smi not found)"
    )
    p = plan(settings(workers=2), Detected((), "none"))
    assert visible(p) == [None, None]
    assert plan(settings(workers=0), Detected((), "none")).count == 0
    # A pinned device keeps its meaning: no CUDA_VISIBLE_DEVICES that would renumber it.
    assert visible(plan(settings(device="cuda:1"), host(4))) == [None]
    # No GPU chosen (`--gpus ""`): hidden from the worker, which would otherwise see them all.
    p = plan(settings(gpus=""), host(4))
    assert [dict(sl.env) for sl in p.slots] == [{"CUDA_VISIBLE_DEVICES": ""}] and not p.uses_gpus
    assert p.describe() == "1 worker, no GPU assigned (gpus is empty: GPUs hidden from the workers)"
    # A group on the CPU is the operator's explicit choice.
    assert plan(settings(device="cpu", gpus_per_job=2), Detected((), "none")).count == 1


@pytest.mark.parametrize(
    ("kw", "detected", "message"),
    [
        ({"gpus": [4]}, host(4), "names GPU 4, which this host does not show: it shows GPU 0 (NVIDIA H200)"),
        ({"gpus": [0]}, Detected((), "none", "nvidia-smi not found"), "does not show: nvidia-smi not found"),
        ({"gpus": [1, 1]}, host(4), "names a GPU twice: 1,1"),
        ({"gpus": [0], "device": "cpu"}, host(4), "but the device is 'cpu'"),
        ({"gpus_per_job": 8}, host(4), "gpus_per_job=8 needs 8 GPUs, and only 4 are available: GPU 0"),
        ({"gpus": [2], "gpus_per_job": 2}, host(4), "gpus_per_job=2 needs 2 GPUs, and only 1 is available"),
        ({"gpus_per_job": 2}, Detected((), "none", "nvidia-smi not found"), "set WAN_VACE_DEVICE=cpu"),
    ],
)  # fmt: skip
def test_gpus_that_are_not_there_are_clear_errors(kw, detected, message):
    with pytest.raises(GpuPlanError) as ei:
        plan(settings(**kw), detected, environ={})
    assert message in str(ei.value)


# Settings and the CLI ----------------------------------------------------------------------------
@pytest.fixture
def two_gpus(tmp_path, monkeypatch):
    """This process sees a host with two GPUs: the fake nvidia-smi first on PATH."""
    for k in list(os.environ):
        if k.upper().startswith("WAN_VACE_") or k.startswith("CUDA_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path, 2)}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_the_worker_count_is_the_plans(two_gpus):
    assert Settings().worker_count == 2
    assert Settings(gpus="1").worker_count == 1 and Settings(gpus_per_job=2).worker_count == 1
    assert Settings(workers=5).worker_count == 5 and Settings(device="cpu").worker_count == 1


def test_the_cli_refuses_gpus_that_are_not_there_before_starting(two_gpus, capsys):
    for argv in (["serve", "--gpus", "2"], ["worker", "--gpus-per-job", "3"], ["serve", "--gpus", "0,x"]):
        with pytest.raises(SystemExit) as ei:
            cli.main([*argv, "--data-dir", str(two_gpus)])
        assert ei.value.code == 2, argv
    err = capsys.readouterr().err
    assert "names GPU 2, which this host does not show: it shows GPU 0 (NVIDIA H200), GPU 1" in err
    assert "gpus_per_job=3 needs 3 GPUs, and only 2 are available" in err
    assert "gpus must be CUDA device indices separated by commas" in err
    with pytest.raises(SystemExit) as ei:
        cli.main(["worker", "--workers", "0", "--data-dir", str(two_gpus)])
    assert ei.value.code == 2 and "serve --workers 0 runs an API replica" in capsys.readouterr().err


def test_settings_shows_the_flags_and_the_plan(two_gpus, capsys):
    assert cli.main(["settings", "--data-dir", str(two_gpus), "--gpus", "1,0", "--shutdown-grace", "5"]) == 0
    out = capsys.readouterr().out
    assert "Worker plan: 2 workers: worker 1 on GPU 1 (NVIDIA H200); worker 2 on GPU 0 (NVIDIA H200)" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("WAN_VACE_SHUTDOWN_GRACE"))
    assert line.split()[1:] == ["flag", "5.0"]
    assert cli.main(["settings", "--data-dir", str(two_gpus), "--gpus-per-job", "4"]) == 2
    assert "Worker plan: none: gpus_per_job=4 needs 4 GPUs" in capsys.readouterr().out
