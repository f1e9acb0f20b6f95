"""Where a step's time goes: host phases (schedule, forward, sample, post-process) and GPU busy/idle from CUDA events.

Off by default (the engine holds None); benchmarks switch it on with `engine.timer = StepTimer(device)`.
"""

import time
from dataclasses import dataclass, field

import torch

PHASES = ("schedule", "forward", "sample", "post")


@dataclass
class _Step:
    kind: str  # "decode" (every row one token) or "mixed" (prefill or chunk rows too)
    rows: int
    host: dict[str, float] = field(default_factory=dict)  # phase -> seconds on the host
    gpu: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # around the step's device work


class StepTimer:
    """Collects one record per engine step; `summary()` turns them into means and the GPU idle fraction."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.steps: list[_Step] = []
        self._cur: _Step | None = None
        self._t = 0.0

    def begin(self) -> None:
        self._t = time.perf_counter()

    def mark(self, phase: str) -> None:
        """The host time since the last mark belongs to `phase`."""
        now = time.perf_counter()
        if self._cur is not None:
            self._cur.host[phase] = self._cur.host.get(phase, 0.0) + now - self._t
        self._t = now

    def start_step(self, kind: str, rows: int) -> None:
        self._cur = _Step(kind, rows)
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._cur.gpu = (start, torch.cuda.Event(enable_timing=True))

    def device_work_queued(self) -> None:
        """Everything of this step is on the stream: the end event follows it."""
        if self._cur is not None and self._cur.gpu is not None:
            self._cur.gpu[1].record()

    def end_step(self) -> None:
        if self._cur is not None:
            self.steps.append(self._cur)
        self._cur = None

    def summary(self) -> dict[str, dict[str, float]]:
        """Per step kind: steps, mean rows, mean ms per host phase, mean GPU ms, GPU idle share between steps."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, dict[str, float]] = {}
        for kind in ("decode", "mixed"):
            steps = [s for s in self.steps if s.kind == kind]
            if not steps:
                continue
            row: dict[str, float] = {"steps": len(steps), "rows": sum(s.rows for s in steps) / len(steps)}
            for p in PHASES:
                row[f"{p}_ms"] = 1e3 * sum(s.host.get(p, 0.0) for s in steps) / len(steps)
            row["host_ms"] = sum(row[f"{p}_ms"] for p in PHASES)
            if self.cuda:
                row.update(self._gpu_share(kind))
            out[kind] = row
        return out

    def gpu_ms_of(self, kind: str) -> list[tuple[int, float]]:
        """(rows, GPU ms) of every step of this kind, in order (where a kind's mean hides an uneven step)."""
        if self.cuda:
            torch.cuda.synchronize()
        return [(s.rows, s.gpu[0].elapsed_time(s.gpu[1])) for s in self.steps if s.kind == kind and s.gpu is not None]

    def _gpu_share(self, kind: str) -> dict[str, float]:
        """GPU busy per step (every step of this kind), and idle: the gap from one step's last work to the next
        step's first, over the wall time of those pairs (consecutive steps of this kind only)."""
        timed = [s for s in self.steps if s.kind == kind and s.gpu is not None]
        if not timed:
            return {}
        busy_all = sum(s.gpu[0].elapsed_time(s.gpu[1]) for s in timed)
        busy, gaps = 0.0, 0.0
        for a, b in zip(self.steps, self.steps[1:]):
            if a.kind != kind or b.kind != kind or a.gpu is None or b.gpu is None:
                continue
            busy += a.gpu[0].elapsed_time(a.gpu[1])
            gaps += max(0.0, a.gpu[1].elapsed_time(b.gpu[0]))
        return {"gpu_ms": busy_all / len(timed), "gpu_idle_share": gaps / (busy + gaps) if busy + gaps else 0.0}
