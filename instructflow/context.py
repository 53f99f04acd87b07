"""What a stage's function is given: `StageContext` (runner.run_stage builds it).

Its configuration, its inputs and outputs by name (as the registry declares
them), its timer, its accelerator and its run key. A stage module imports this
and nothing of the registry or the runner, so that neither is part of the code
a stage's run key covers (registry.code_files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Params
from .io import StageTimer

if TYPE_CHECKING:  # types only: the registry is not code a stage runs
    from .registry import RunKey, StageSpec


@dataclass
class StageContext:
    """What a stage's function works with: its configuration, its files by name, its timer and run key."""

    params: Params
    spec: StageSpec
    key: RunKey
    timer: StageTimer = field(default_factory=StageTimer)
    main_process: bool = True                  # False in the helper processes of a multi-process run

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def run_key(self) -> str:
        return self.key.key

    @property
    def folder(self) -> Path:
        """artifacts/<stage>/: the stage's own folder (checkpoints, trackers, scratch files)."""
        path = Path(self.spec.folder)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def input(self, name: str) -> Path:
        """The input `name` as the registry declares it (ctx.input("sft") -> artifacts/sft/model)."""
        return self._declared("input", self.spec.inputs, name)

    def has_input(self, name: str) -> bool:
        return name in self.spec.inputs

    def output(self, name: str) -> Path:
        """The output `name` (an out, a report or a plot) as the registry declares it."""
        return self._declared("output", self.spec.outputs, name)

    def _declared(self, kind: str, files: dict[str, str], name: str) -> Path:
        if name not in files:
            raise KeyError(f"stage {self.name} declares no {kind} '{name}' (it has {', '.join(files)}): "
                           "declare it in instructflow/registry.py")
        return Path(files[name])

    def phase(self, name: str):
        """Time a named phase of the stage (result.json's timings)."""
        return self.timer.phase(name)

    def accelerator(self, grad_accum: int = 1):
        """The stage's accelerate.Accelerator (CPU, one GPU or many; its precision from model.mixed_precision,
        its trackers under artifacts/<stage>/trackers). Only the main process will write the records."""
        from .lm.training import make_accelerator

        acc = make_accelerator(self.params.project, grad_accum, self.params.model.mixed_precision,
                               self.folder / "trackers", self.name)
        self.main_process = acc.is_main_process
        return acc
