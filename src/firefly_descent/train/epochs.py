"""The epoch loop: for each epoch, [grow if the previous epoch was a growth epoch → checkpoint]
→ train → evaluate → log → checkpoint.

Growth "after epoch E" therefore happens at the start of iteration E + 1, so a checkpoint taken after
epoch E can be resumed either before or after the growth; a run killed mid-epoch restarts that epoch
from the last checkpoint.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .device import to_device
from .growth_step import grow
from .metrics import summarize
from .precision import autocast
from .progress import ProgressLines, done_line
from .state import Run

__all__ = ["ANYTIME_EPOCHS", "epoch_line", "run_epochs", "train_epoch"]

# epochs after a growth at which its record gets the held-out numbers (`after_epochs`)
ANYTIME_EPOCHS = (1, 3)

_TENSORBOARD_KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "val_loss", "val_acc", "params", "lr")


def train_epoch(run: Run) -> dict[str, Any]:
    """Train one epoch (epoch `run.epochs_done`); return its train loss/accuracy, last LR and time."""
    cfg, s = run.cfg, run.s
    E = run.epochs_done
    model, opt = run.rt.forward_module(run.model), run.optimizer
    model.train()
    run.rt.set_epoch(E)
    nb = len(s.train_loader)
    total, loss_sum, correct = 0, 0.0, 0
    lr = run.schedule.lr_at(E, 0, nb)
    t0 = time.perf_counter()
    bar = tqdm(
        s.train_loader,
        total=nb,
        desc=f"epoch {E + 1}/{cfg.train.epochs}",
        leave=False,
        disable=not run.progress,
        dynamic_ncols=True,
    )
    lines = ProgressLines(nb, f"epoch {E + 1}/{cfg.train.epochs}") if run.progress_lines else None
    for b, (x, y) in enumerate(bar):
        lr = run.schedule.apply(opt, E, b, nb)
        x, y = run.rt.inputs(to_device(x, run.device)), to_device(y, run.device)
        opt.zero_grad(set_to_none=True)
        with autocast(run.device, run.amp):
            out = model(x)
            loss = run.loss_fn(out, y)
            aux = model.auxiliary_loss(y, run.loss_fn) if hasattr(model, "auxiliary_loss") else None
            loss = loss if aux is None else loss + aux  # e.g. a DARTS network's auxiliary head
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {float(loss)} at epoch {E + 1}, step {run.step}; "
                "lower optim.lr or check the data"
            )
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.step(opt)
            run.scaler.update()
        else:
            loss.backward()
            opt.step()
        n = int(y.shape[0])
        total += n
        loss_sum += float(loss.detach()) * n
        if s.task == "classification":
            correct += int((out.detach().argmax(dim=1) == y).sum())
        run.step += 1
        if lines is not None:
            lines.update(b + 1, loss_sum / total)
        if run.step % cfg.train.log_every == 0:
            if run.progress:
                bar.set_postfix(loss=f"{loss_sum / total:.4f}", lr=f"{lr:.3g}")
            if run.files.writer is not None:
                run.files.scalar("train/batch_loss", float(loss.detach()), run.step)
                run.files.scalar("train/lr", lr, run.step)
    bar.close()
    total, loss_sum, correct = run.rt.reduce_sums(total, loss_sum, correct)
    train_time = time.perf_counter() - t0
    return {
        "train_loss": loss_sum / max(total, 1),
        "train_acc": (correct / max(total, 1)) if s.task == "classification" else None,
        "lr": lr,
        "epoch_time": train_time,
    }


def _epoch_row(run: Run) -> dict[str, Any]:
    """Train and evaluate epoch `run.epochs_done`; the metrics row it logs."""
    s, E = run.s, run.epochs_done
    t0 = time.perf_counter()
    row: dict[str, Any] = {"epoch": E + 1}
    row.update(train_epoch(run))
    t_eval = time.perf_counter()
    test = run.rt.evaluate(run.model, s.test_loader, run.device, s.task, run.amp)
    row["test_loss"], row["test_acc"] = test["loss"], test["acc"]
    if s.val_loader is not None:
        val = run.rt.evaluate(run.model, s.val_loader, run.device, s.task, run.amp)
        row["val_loss"], row["val_acc"] = val["loss"], val["acc"]
    row["eval_time"] = time.perf_counter() - t_eval
    row["params"] = run.params
    row["flops"] = run.flops
    row["growth_time"] = float(sum(r.get("time", 0.0) for r in run.growths if r["epoch"] == E))
    row["growths"] = run.num_growths
    row["step"] = run.step
    run.elapsed += time.perf_counter() - t0
    row["elapsed"] = run.elapsed
    return row


def run_epochs(run: Run) -> dict[str, Any]:
    """Run (or continue) the epoch loop to ``train.epochs``; write ``summary.json`` and return it."""
    cfg = run.cfg
    epochs = cfg.train.epochs
    ebar = tqdm(
        total=epochs, initial=run.epochs_done, desc=cfg.name, unit="epoch", disable=not run.progress, dynamic_ncols=True
    )
    try:
        while True:
            if not run.growth_done_for_epoch:
                due = run.growth_due()
                run.growth_done_for_epoch = True
                if due:
                    grow(run)
                    run.save_checkpoint(after_growth=True)
            if run.epochs_done >= epochs:
                break
            row = _epoch_row(run)
            run.metrics.append(row)
            run.epochs_done += 1
            run.growth_done_for_epoch = False
            run.files.append_jsonl("metrics.jsonl", row)
            if note_anytime(run.growths, row):
                run.files.rewrite_jsonl("growth.jsonl", run.growths)
            run.log(epoch_line(row, epochs))
            for k in _TENSORBOARD_KEYS:
                if row.get(k) is not None:
                    run.files.scalar(k.replace("_", "/", 1), row[k], row["epoch"])
            run.save_checkpoint()
            run.emit("on_epoch_end", row)
            ebar.update(1)
    finally:
        ebar.close()
        run.files.close()
    summary = summarize(run.metrics, run.growths)
    summary["run_dir"] = str(run.run_dir)
    run.files.write_summary(summary)
    run.log(done_line(summary))
    run.emit("on_train_end", summary)
    return summary


def note_anytime(growths: list[dict[str, Any]], row: dict[str, Any]) -> bool:
    """Attach this epoch's held-out numbers to each growth it follows by 1 or 3 epochs (`after_epochs`):
    a method's value may be a head start rather than final accuracy. True when a record changed."""
    changed = False
    for rec in growths:
        k = int(row["epoch"]) - int(rec["epoch"])
        if k in ANYTIME_EPOCHS:
            keys = ("test_loss", "test_acc", "val_loss", "val_acc", "train_loss", "train_acc", "params")
            rec.setdefault("after_epochs", {})[str(k)] = {key: row.get(key) for key in keys}
            changed = True
    return changed


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """The log line of one epoch's metrics row."""

    def fmt(loss: float | None, acc: float | None) -> str:
        if loss is None:
            return "n/a"
        return f"{loss:.4f}" + (f"/{acc:.2%}" if acc is not None else "")

    parts = [
        f"epoch {row['epoch']}/{epochs}",
        f"train {fmt(row['train_loss'], row['train_acc'])}",
        f"test {fmt(row['test_loss'], row['test_acc'])}",
    ]
    if "val_loss" in row:
        parts.append(f"val {fmt(row['val_loss'], row['val_acc'])}")
    parts.append(f"params {row['params']:,}")
    parts.append(f"lr {row['lr']:.3g}")
    t = row["epoch_time"]
    parts.append(f"{t:.2f}s" if t < 10 else f"{t:.0f}s")
    return " | ".join(parts)
