"""Faults injected on purpose, for the tests that show a slow or failing step is survived.

Off unless the environment sets ``DEMESNE_TEST_FAULTS``, e.g. ``step_sleep=8`` (every decode
takes 8 s longer: a slow machine) or ``raise_at_step=3`` (the fourth step raises), separated
by commas. Nothing here runs in normal service beyond one attribute test per step.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

log = logging.getLogger("demesne.engine")

ENV = "DEMESNE_TEST_FAULTS"


class InjectedFault(RuntimeError):
    """The exception a test asked for."""


@dataclass(frozen=True, slots=True)
class Faults:
    step_sleep: float = 0.0
    raise_at_step: int = -1

    @classmethod
    def from_env(cls) -> Faults:
        spec = os.environ.get(ENV, "")
        if not spec:
            return cls()
        values = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
        faults = cls(float(values.get("step_sleep", 0.0)), int(values.get("raise_at_step", -1)))
        log.warning("test faults are on: %s", faults)
        return faults

    def before_decode(self, step: int) -> None:
        if self.step_sleep:
            time.sleep(self.step_sleep)  # releases the GIL, as llama_decode does
        if step == self.raise_at_step:
            raise InjectedFault(f"fault injected at step {step}")
