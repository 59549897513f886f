"""What a growth step reports: `GrowthReport` (printable, JSON-serialisable), the loss-function type every
grower takes, and `Timer` for the report's timings. A module of its own so that the safeguard
(methods/safety.py) and the grower template (methods/base.py) both read it without importing each other."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GrowthReport:
    """What one growth step did, printable and JSON-serialisable."""

    method: str
    units_split: dict[str, int] = field(default_factory=dict)
    units_added: dict[str, int] = field(default_factory=dict)
    layers_inserted: list[str] = field(default_factory=list)
    widths_before: dict[str, int] = field(default_factory=dict)
    widths_after: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    flops_before: int | None = None
    flops_after: int | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    predicted_loss_change: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # what the after-apply check measured and did (methods/safety.py: SafetyRecord), None if not run
    safety: Any = None

    @property
    def outcome(self) -> str | None:
        """accepted | shrunk | rolled-back | unchecked | empty (None when no check ran)."""
        return getattr(self.safety, "outcome", None)

    @property
    def heldout_loss_change(self) -> float | None:
        """Train-mode loss change on held-out growth batches (the mode training continues in)."""
        s = self.safety
        if s is None or not s.heldout_before or not s.heldout_after:
            return None
        return s.heldout_after["train"] - s.heldout_before["train"]

    @property
    def heldout_predicted_mode_change(self) -> float | None:
        """Held-out loss change in the mode the methods predict in (eval, the old running statistics):
        the number to hold `predicted_loss_change` against."""
        s = self.safety
        if s is None or "eval_stale" not in s.heldout_before or "eval_stale" not in s.heldout_after:
            return None
        return s.heldout_after["eval_stale"] - s.heldout_before["eval_stale"]

    @property
    def measured_loss_change(self) -> float | None:
        if self.loss_before is None or self.loss_after is None:
            return None
        return self.loss_after - self.loss_before

    @property
    def total_time(self) -> float:
        return float(sum(self.timings.values()))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["measured_loss_change"] = self.measured_loss_change
        d["total_time"] = self.total_time
        d["outcome"] = self.outcome
        d["heldout_loss_change"] = self.heldout_loss_change
        d["heldout_predicted_mode_change"] = self.heldout_predicted_mode_change
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=float)

    def __str__(self) -> str:
        lines = [f"GrowthReport[{self.method}]"]
        groups = sorted(set(self.widths_before) | set(self.widths_after))
        for g in groups:
            s, a = self.units_split.get(g, 0), self.units_added.get(g, 0)
            wb, wa = self.widths_before.get(g, "?"), self.widths_after.get(g, "?")
            if s or a or wb != wa:
                lines.append(f"  {g:<40} {wb:>5} -> {wa:<5} (split {s}, new {a})")
        for name in self.layers_inserted:
            lines.append(f"  new layer after {name}")
        lines.append(f"  params {self.params_before:,} -> {self.params_after:,}")
        if self.flops_before is not None and self.flops_after is not None:
            lines.append(f"  FLOPs  {self.flops_before:,} -> {self.flops_after:,}")
        if self.loss_before is not None:
            pred = self.predicted_loss_change
            meas = self.measured_loss_change
            after = self.loss_after if self.loss_after is not None else float("nan")
            lines.append(
                f"  loss {self.loss_before:.4f} -> {after:.4f}"
                + (
                    f" (predicted change {pred:+.4f}, measured {meas:+.4f})"
                    if pred is not None and meas is not None
                    else ""
                )
            )
        s = self.safety
        if s is not None and s.outcome == "empty":
            lines.append(f"  check: empty ({self.extra.get('empty_reason') or 'the plan changes nothing'})")
        for group, why in sorted((self.extra.get("skipped_groups") or {}).items()):
            lines.append(f"  skipped {group}: {why}")
        for what, why in sorted((self.extra.get("skipped_candidates") or {}).items()):
            lines.append(f"  skipped {what}: {why}")
        if s is not None and s.outcome not in ("empty",):
            hb, ha = s.heldout_before, s.heldout_after
            held = ""
            if hb and ha:
                held = f"; held-out loss (train mode) {hb['train']:.4f} -> {ha['train']:.4f}"
                held += f", eval {hb['eval']:.4f} -> {ha['eval']:.4f}"
            amp = f" at amplitude {s.amplitude:g}" if s.amplitude is not None else ""
            lines.append(f"  check: {s.outcome}{amp}{held}")
        if self.timings:
            lines.append("  time " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


class Timer:
    """`with Timer(report.timings, "step_one"):` records wall time of a block."""

    def __init__(self, sink: dict[str, float], key: str) -> None:
        self.sink, self.key = sink, key

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sink[self.key] = self.sink.get(self.key, 0.0) + time.perf_counter() - self.t0
