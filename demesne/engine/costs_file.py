"""Step costs kept across starts (``--step-costs-file``).

Measuring what a decode of n rows costs (:meth:`.speculate.StepCosts.calibrate`) takes seconds
at every start of an engine with speculative decoding or padded steps: about 4 s of an 8 s
start on a 2-core CPU. A restart after a crash pays it again while requests wait, and so does
every engine a test suite starts. The measurements of a start are therefore kept, and the
next start with the same set-up times only a few sizes again (``StepCosts._retime``), each
size keeping its least time over the starts, and keeps the result here.

One JSON file holds several set-ups, each under a key that hashes everything the times
depend on: the model file and its KV settings (the runner's KV fingerprint, which names the
llama.cpp build too), the decode's settings (threads, ubatch, offload, GPUs), and the
machine (its CPU, the cores this process may use, the GPUs it is shown, and llama.cpp's
system info). A GPU swapped for another under the same
index keeps the key: where that changes the costs by more than ``RECHECK_SPEED``, the sizes
timed again say so and all are measured again.

The file is written whole and renamed into place, so engines starting together never read
half of one; one may lose the other's entry, which the next start measures again. A file
that cannot be read or written costs a measurement, never a start.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import tempfile
import time

import orjson

log = logging.getLogger("demesne.engine")

MAX_ENTRIES = 32  # set-ups kept; the least recently saved goes first


def costs_key(config, runner) -> str:
    """What the step costs of ``config`` on ``runner`` depend on, hashed. Not the number of
    sequences or cells: a decode of n rows of one sequence costs the same whatever the
    others (the sizes an engine needs and the entry lacks are measured then)."""
    c = config
    parts = [
        runner.kv_fingerprint(),
        f"threads={c.threads}/{c.threads_batch} ubatch={c.ubatch_size} deterministic={c.deterministic}",
        f"gpu_layers={c.n_gpu_layers} split={c.split_mode}:{list(c.tensor_split)} main_gpu={c.main_gpu}",
        _machine(),
        runner.system_info(),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# The GPUs a process sees (one engine per GPU: each unit of deploy/ sees its own as device 0).
DEVICE_VARIABLES = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GGML_VK_VISIBLE_DEVICES")


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    devices = " ".join(f"{v}={os.environ[v]}" for v in DEVICE_VARIABLES if v in os.environ)
    return f"{cpu} cores={cores} {devices}"


def load(path: str, key: str) -> dict | None:
    """The measurements kept under ``key`` (``StepCosts.measurements``' shape), or None."""
    try:
        with open(path, "rb") as f:
            entries = orjson.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cannot read step costs from %s (%s): measuring them", path, exc)
        return None
    entry = entries.get(key) if isinstance(entries, dict) else None
    if entry is None:
        return None
    try:
        starts = entry["starts"]
        if not isinstance(starts, int) or starts < 1:
            raise ValueError(f"starts: {starts!r}")
        drift = float(entry.get("drift", 0.0))
        if not math.isfinite(drift):
            raise ValueError(f"drift: {drift!r}")
        return {"quiet": _times(entry["quiet"]), "noisy": _times(entry["noisy"]), "starts": starts, "drift": drift}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        log.warning("a bad entry in %s (%r): measuring step costs", path, exc)
        return None


def _times(part: dict) -> dict[int, float]:
    times = {int(n): float(t) for n, t in part.items()}
    if not all(n >= 1 and math.isfinite(t) and t > 0 for n, t in times.items()):
        raise ValueError("a size or a time out of range")
    return times


def save(path: str, key: str, measurements: dict) -> None:
    """Keep ``measurements`` under ``key``, beside the other set-ups' (the oldest dropped)."""
    try:
        try:
            with open(path, "rb") as f:
                entries = orjson.loads(f.read())
            if not isinstance(entries, dict):
                entries = {}
        except (OSError, ValueError):
            entries = {}
        entries[key] = {
            "quiet": {str(n): t for n, t in measurements["quiet"].items()},
            "noisy": {str(n): t for n, t in measurements["noisy"].items()},
            "starts": measurements["starts"],
            "drift": measurements.get("drift", 0.0),
            "saved": time.time(),
        }
        if len(entries) > MAX_ENTRIES:
            oldest = sorted(entries, key=lambda k: entries[k].get("saved", 0) if isinstance(entries[k], dict) else 0)
            for k in oldest[: len(entries) - MAX_ENTRIES]:
                del entries[k]
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, partial = tempfile.mkstemp(prefix=".step-costs.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(orjson.dumps(entries))
            os.replace(partial, path)
        except BaseException:
            os.unlink(partial)
            raise
    except OSError as exc:
        log.warning("cannot keep step costs in %s: %s", path, exc)
