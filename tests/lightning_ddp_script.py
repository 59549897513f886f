"""One 2-process Lightning DDP run on CPU (gloo) that grows, for tests/test_integration_lightning.py.

    python tests/lightning_ddp_script.py OUT_DIR

Lightning's `strategy="ddp"` starts rank 1 by running this script again; each rank writes OUT_DIR/rank<r>.pt
with its architecture hash, growth history, parameter count and weights after training on past the growth.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from firefly_descent.engine import growth_history
from firefly_descent.integrations.lightning import FireflyCallback
from firefly_descent.train.hashing import architecture_hash


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    L.seed_everything(0, verbose=False)
    model = Net()
    params0 = sum(p.numel() for p in model.parameters())
    cb = FireflyCallback("firefly", at=[1], loss_fn=F.cross_entropy)
    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", callbacks=[cb], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    torch.save(
        {
            "hash": architecture_hash(model, trainer.optimizers[0]),
            "history": growth_history(model),
            "params_before": params0,
            "params": sum(p.numel() for p in model.parameters()),
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "grown_after": cb.grown_after,
            "world": trainer.world_size,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
