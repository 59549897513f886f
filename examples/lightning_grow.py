"""Grow a LightningModule with Firefly while Lightning owns the optimizer, the scheduler, DDP and checkpoints.

    python examples/lightning_grow.py              # an MLP on the generated digits data set, CPU, well under a minute
    python examples/lightning_grow.py --ddp        # the same on 2 CPU processes (gloo): both ranks grow the same
    python examples/lightning_grow.py --resume     # then fit again from the checkpoint taken after the first growth

Needs `pip install "firefly-descent[lightning]"`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Sampler

from firefly_descent.data import load_dataset
from firefly_descent.integrations.lightning import FireflyCallback


class EpochShuffle(Sampler[int]):
    """A shuffle that depends only on the seed and the epoch (Lightning calls `set_epoch`): a run resumed from a
    checkpoint sees the batches an uninterrupted one sees. (A loader shuffling from a generator, or from the global
    RNG, continues from wherever its state is: Lightning's checkpoints do not hold it.)"""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # noqa: ANN204
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


class Classifier(L.LightningModule):
    def __init__(self, inputs: int, classes: int, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width),
                                 nn.ReLU(), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=1e-4)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--ddp", action="store_true", help="2 CPU processes with strategy='ddp'")
    ap.add_argument("--resume", action="store_true", help="fit again from the checkpoint after the first growth")
    args = ap.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    bundle = load_dataset("digits", seed=0)
    train = DataLoader(bundle.train, batch_size=64, sampler=EpochShuffle(len(bundle.train)))
    test = DataLoader(bundle.test, batch_size=256)
    inputs = int(torch.tensor(bundle.input_shape).prod())

    def trainer(ckpt_dir: Path, callback: FireflyCallback) -> L.Trainer:
        return L.Trainer(
            max_epochs=args.epochs, accelerator="cpu", devices=2 if args.ddp else 1,
            strategy="ddp" if args.ddp else "auto", logger=False, enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[callback, ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1)],
        )

    # grow after epochs 2 and 4; growth batches come from the train loader, the loss is the model's
    grow = FireflyCallback("firefly", every=2, loss_fn=F.cross_entropy)
    with tempfile.TemporaryDirectory() as tmp:
        model = Classifier(inputs, bundle.num_classes)
        t = trainer(Path(tmp), grow)
        t.fit(model, train, test)
        if t.is_global_zero:
            for epoch, report in zip(grow.grown_after, grow.reports):
                print(f"after epoch {epoch}:\n{report}")
            params = sum(p.numel() for p in model.parameters())
            print(f"{model.net}\nparams {params:,}; val acc {t.callback_metrics['val_acc']:.3f}")
        if args.resume:
            again = Classifier(inputs, bundle.num_classes)  # the original architecture: the checkpoint regrows it
            t2 = trainer(Path(tmp) / "resumed", FireflyCallback("firefly", every=2, loss_fn=F.cross_entropy))
            t2.fit(again, train, test, ckpt_path=str(Path(tmp) / "epoch=2.ckpt"))  # end of epoch 3
            same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
            if t2.is_global_zero:
                print(f"resumed from the checkpoint after the first growth: same final weights: {same}")


if __name__ == "__main__":
    main()
