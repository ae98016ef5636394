"""The GPUs of this host and which worker gets which: the worker plan.

Found without torch (the API process never imports it, and a CUDA context in the parent would
be inherited by nothing but cost memory on every GPU): `CUDA_VISIBLE_DEVICES` when it is set
(what CUDA itself would show this process), else `nvidia-smi -L`, else none.

The plan turns `gpus` (which of them, by CUDA index: `--gpus 0,1`), `gpus_per_job` (the size of
a group one job runs on) and `workers` into worker slots, each with the environment its process
starts with: `CUDA_VISIBLE_DEVICES` naming its group, so every worker counts its own GPUs from 0.
Four GPUs in groups of two make two slots, "0,1" and "2,3"; GPUs left over that do not fill a
group stay unused (with a warning). `workers` unset means one slot per group (one on a host
without a GPU); set, it wins: 0 is an API replica, N slots take the groups in turn.

Indices from nvidia-smi are its PCI-bus order, which is not CUDA's default order on a host with
mixed GPUs, so a slot planned from nvidia-smi also sets `CUDA_DEVICE_ORDER=PCI_BUS_ID` (unless the
environment chose an order): the worker then gets the GPU the operator saw in nvidia-smi.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.settings import Settings

log = logging.getLogger("wan_vace.gpus")

NVIDIA_SMI_TIMEOUT_S = 5.0
# `GPU 0: NVIDIA H200 (UUID: GPU-5d3c...)`; MIG devices are listed indented below their GPU and
# are not matched (give their UUIDs in CUDA_VISIBLE_DEVICES to use them).
_SMI_LINE = re.compile(r"^GPU (\d+): (.*?)(?: \(UUID: ([^)\s]+)\))?\s*$")
# A device CUDA_VISIBLE_DEVICES can name besides an index: a GPU or MIG UUID (or its prefix).
_UUID = re.compile(r"^(GPU|MIG)-[0-9A-Za-z-/]+$")


class GpuPlanError(ValueError):
    """The settings ask for GPUs this host does not have (a usage error at start-up)."""


@dataclass(frozen=True)
class Gpu:
    index: int  # its CUDA index in this process (the position among the visible GPUs)
    id: str  # how CUDA_VISIBLE_DEVICES names it: an index ("3") or a UUID ("GPU-...")
    name: str = ""  # "NVIDIA H200", when nvidia-smi said
    uuid: str = ""

    def describe(self) -> str:
        return f"GPU {self.index}" + (f" ({self.name})" if self.name else "")


@dataclass(frozen=True)
class Detected:
    gpus: tuple[Gpu, ...]
    source: str  # "CUDA_VISIBLE_DEVICES", "nvidia-smi" or "none"
    note: str = ""  # why none were found, when it is worth saying


@dataclass(frozen=True)
class Slot:
    """One worker process (a group of GPUs for it, or none) and what its environment changes."""

    number: int  # 1-based, for logs
    gpus: tuple[Gpu, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def cuda_visible_devices(self) -> str | None:
        return self.env.get("CUDA_VISIBLE_DEVICES")

    def info(self) -> dict[str, Any]:
        """What the worker row says about its GPUs (merged into its `info`)."""
        if not self.gpus:
            return {}
        info: dict[str, Any] = {"gpus": ",".join(g.id for g in self.gpus)}
        names = [g.name for g in self.gpus if g.name]
        if names:
            info["gpu_names"] = names
        return info

    def describe(self) -> str:
        if not self.gpus:
            return f"worker {self.number}"
        return f"worker {self.number} on " + ", ".join(g.describe() for g in self.gpus)


@dataclass(frozen=True)
class Plan:
    slots: tuple[Slot, ...]
    detected: Detected
    gpus_per_job: int = 1
    warnings: tuple[str, ...] = ()
    uses_gpus: bool = False  # slots were given GPUs (a GPU host, device not cpu)

    @property
    def count(self) -> int:
        return len(self.slots)

    def describe(self) -> str:
        """One line for logs and `wan-vace settings`."""
        if not self.slots:
            return "no local worker (API only: workers=0)"
        n = f"{self.count} worker{'s' if self.count != 1 else ''}"
        if not self.uses_gpus:
            why = self.detected.note or f"GPUs found by {self.detected.source}, not used"
            return f"{n}, no GPU assigned ({why})"
        per = f", {self.gpus_per_job} GPUs per job" if self.gpus_per_job > 1 else ""
        return f"{n}{per}: " + "; ".join(s.describe() for s in self.slots)


# Detection ---------------------------------------------------------------------------------------
def parse_visible_devices(value: str) -> list[str]:
    """The devices a CUDA_VISIBLE_DEVICES value names, as CUDA reads it: entries up to the first
    that is empty, negative ("-1" hides every GPU) or not a device name; "" names none."""
    out: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if re.fullmatch(r"\d+", entry):
            out.append(str(int(entry)))
        elif _UUID.match(entry):
            out.append(entry)
        else:  # "", "-1", junk: CUDA ignores it and everything after it
            break
    return out


def nvidia_smi_gpus(executable: str | None, timeout: float = NVIDIA_SMI_TIMEOUT_S) -> tuple[list[Gpu], str]:
    """The GPUs `nvidia-smi -L` lists, and a note when it could not tell (absent, failing, slow)."""
    if executable is None:
        return [], "nvidia-smi not found"
    try:
        r = subprocess.run([executable, "-L"], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return [], f"nvidia-smi did not answer within {timeout:g} s"
    except OSError as e:
        return [], f"nvidia-smi could not run ({e})"
    if r.returncode != 0:  # no driver loaded, a container without the device files, ...
        first = (r.stdout or r.stderr).strip().splitlines()[:1]
        return [], f"nvidia-smi failed ({first[0] if first else f'exit status {r.returncode}'})"
    gpus = []
    for line in r.stdout.splitlines():
        m = _SMI_LINE.match(line)
        if m:
            gpus.append(Gpu(index=len(gpus), id=m.group(1), name=m.group(2).strip(), uuid=m.group(3) or ""))
    return gpus, "" if gpus else "nvidia-smi lists no GPU"


def detect(environ: Mapping[str, str] | None = None, nvidia_smi: str | None = "") -> Detected:
    """This host's GPUs as a worker process would see them. `nvidia_smi`: the executable, "" to
    look it up on PATH, None for none."""
    environ = os.environ if environ is None else environ
    if nvidia_smi == "":
        nvidia_smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        ids = parse_visible_devices(value)
        if not ids:
            return Detected((), "CUDA_VISIBLE_DEVICES", f"CUDA_VISIBLE_DEVICES={value!r} hides every GPU")
        # Names for the log when nvidia-smi is there; the list itself is CUDA_VISIBLE_DEVICES'.
        known = nvidia_smi_gpus(nvidia_smi)[0] if nvidia_smi else []
        by_id = {g.id: g for g in known} | {g.uuid: g for g in known if g.uuid}

        def named(i: int, d: str) -> Gpu:
            # A UUID may be given by a prefix, as CUDA accepts it.
            g = by_id.get(d) or next(
                (k for k in known if d.startswith("GPU-") and k.uuid.startswith(d)), None
            )
            return Gpu(index=i, id=d, name=g.name if g else "", uuid=g.uuid if g else "")

        return Detected(tuple(named(i, d) for i, d in enumerate(ids)), "CUDA_VISIBLE_DEVICES")
    gpus, note = nvidia_smi_gpus(nvidia_smi)
    return Detected(tuple(gpus), "nvidia-smi" if gpus else "none", note)


@lru_cache(maxsize=8)
def _detect_cached(visible: str | None, nvidia_smi: str | None) -> Detected:
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    return detect(env, nvidia_smi)


def host_gpus() -> Detected:
    """`detect()` for this process, asked once per distinct environment: /health reads the
    plan on every call, and nvidia-smi takes a moment."""
    return _detect_cached(os.environ.get("CUDA_VISIBLE_DEVICES"), shutil.which("nvidia-smi"))


# The plan ----------------------------------------------------------------------------------------
def _gpu_mode(device: str) -> bool:
    """Whether the device setting lets the plan hand out GPUs: "auto" and "cuda" do; "cpu" does
    not, nor a pinned device ("cuda:1"), whose index a narrowed CUDA_VISIBLE_DEVICES would move."""
    return device.strip().lower() in ("auto", "cuda")


def plan(
    settings: Settings, detected: Detected | None = None, environ: Mapping[str, str] | None = None
) -> Plan:
    """The worker slots for `settings` on a host with `detected` GPUs (default: this one's).
    Raises GpuPlanError for GPUs asked for that are not there."""
    detected = host_gpus() if detected is None else detected
    environ = os.environ if environ is None else environ
    k = settings.gpus_per_job
    warnings: list[str] = []
    gpu_mode = _gpu_mode(settings.device)
    visible = list(detected.gpus) if gpu_mode else []
    if settings.gpus is not None:
        if settings.gpus and not gpu_mode:
            raise GpuPlanError(
                f"gpus (--gpus / WAN_VACE_GPUS) names GPUs {_ints(settings.gpus)}, but the device is "
                f"{settings.device!r}: set WAN_VACE_DEVICE to auto or cuda, or leave gpus unset"
            )
        if len(set(settings.gpus)) != len(settings.gpus):
            raise GpuPlanError(f"gpus (--gpus / WAN_VACE_GPUS) names a GPU twice: {_ints(settings.gpus)}")
        missing = [i for i in settings.gpus if i >= len(visible)]
        if missing:
            raise GpuPlanError(
                f"gpus (--gpus / WAN_VACE_GPUS) names GPU {_ints(missing)}, which this host does not show: "
                + _visible_text(detected)
            )
        visible = [visible[i] for i in settings.gpus]
    if not visible:
        # `--gpus ""`: none of them, so they are hidden from the worker (else CUDA shows it all).
        hidden = settings.gpus == [] and gpu_mode
        if k > 1 and gpu_mode:
            where = "gpus is empty" if hidden else f"this host shows none ({_visible_text(detected)})"
            raise GpuPlanError(
                f"gpus_per_job={k} needs {k} GPUs, and {where}; "
                "set WAN_VACE_DEVICE=cpu to run a group of processes on the CPU"
            )
        n = 1 if settings.workers is None else settings.workers
        if hidden:
            note = "gpus is empty: GPUs hidden from the workers"
        else:
            note = detected.note if gpu_mode else f"device {settings.device}"
        env = {"CUDA_VISIBLE_DEVICES": ""} if hidden else {}
        slots = tuple(Slot(i + 1, (), env) for i in range(n))
        return Plan(slots, Detected(detected.gpus, detected.source, note), k, tuple(warnings))
    if k > len(visible):
        raise GpuPlanError(
            f"gpus_per_job={k} needs {k} GPUs, and only {len(visible)} "
            f"{'are' if len(visible) != 1 else 'is'} available: " + ", ".join(g.describe() for g in visible)
        )
    groups = [tuple(visible[i : i + k]) for i in range(0, len(visible) - k + 1, k)]
    left = visible[len(groups) * k :]
    if left:
        warnings.append(
            f"{', '.join(g.describe() for g in left)} left unused: {len(visible)} GPUs do not divide "
            f"into groups of {k} (gpus_per_job)"
        )
    n = len(groups) if settings.workers is None else settings.workers
    # nvidia-smi's indices are PCI-bus order; CUDA's default order may differ (see the docstring).
    by_bus = detected.source == "nvidia-smi" and "CUDA_DEVICE_ORDER" not in environ
    order = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"} if by_bus else {}
    slots = []
    for i in range(n):  # round-robin: more workers than groups share them
        group = groups[i % len(groups)]
        slots.append(Slot(i + 1, group, {"CUDA_VISIBLE_DEVICES": ",".join(g.id for g in group), **order}))
    return Plan(tuple(slots), detected, k, tuple(warnings), uses_gpus=True)


def _ints(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


def _visible_text(detected: Detected) -> str:
    if detected.gpus:
        shown = ", ".join(g.describe() for g in detected.gpus)
        return f"it shows {shown} (found by {detected.source})"
    return detected.note or "no GPU found"
