"""Grow a transformers model inside `transformers.Trainer`: a tiny BERT classifier on synthetic token data,
grown by Firefly after epochs 1 and 2, saved, reloaded, and resumed from a checkpoint taken after growth.

    pip install -e ".[hf]"
    python examples/hf_grow.py --out runs/hf     # well under a minute on a CPU; nothing is downloaded

The model is built from a config in code (no hub download). The task: is the first token in the lower half of
the vocabulary?
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from firefly_descent.integrations.hf import FireflyTrainerCallback, load_grown, prepare_resume

VOCAB, LENGTH = 32, 8


class Tokens(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        self.labels = (self.ids[:, 0] < VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def config() -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=16, max_position_embeddings=LENGTH, num_labels=2,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def trainer_for(model: BertForSequenceClassification, out: str, epochs: int) -> tuple[Trainer, FireflyTrainerCallback]:
    args = TrainingArguments(out, num_train_epochs=epochs, per_device_train_batch_size=32, learning_rate=3e-3,
                             report_to=[], use_cpu=True, save_strategy="epoch", logging_strategy="epoch", seed=0,
                             disable_tqdm=True)
    grow = FireflyTrainerCallback("firefly", at=[1, 2], budget=0.5, data_batches=4)
    return Trainer(model=model, args=args, train_dataset=Tokens(256, 0), callbacks=[grow]), grow


def accuracy(model: BertForSequenceClassification, data: Tokens) -> float:
    model.eval()
    with torch.no_grad():
        return (model(input_ids=data.ids).logits.argmax(1) == data.labels).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/hf-grow")
    ap.add_argument("--epochs", type=int, default=4)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = BertForSequenceClassification(config())
    before = sum(p.numel() for p in model.parameters())
    trainer, grow = trainer_for(model, a.out, a.epochs)
    trainer.train()
    for report in grow.reports:
        print(report)
    print(f"params {before:,} -> {sum(p.numel() for p in model.parameters()):,}; "
          f"held-out accuracy {accuracy(model, Tokens(256, 1)):.1%}")

    # save and reload: the config carries the growth history; build the model as first constructed
    trainer.save_model(os.path.join(a.out, "final"))
    back = load_grown(os.path.join(a.out, "final"), lambda: BertForSequenceClassification(config()))
    x = Tokens(256, 1).ids
    model.eval()
    same = torch.equal(back(input_ids=x).logits, model(input_ids=x).logits)
    print(f"reloaded from {a.out}/final: same outputs {same}")

    # resume from the checkpoint after epoch 2 (both growths done): regrow first, then let the Trainer load
    ckpt = os.path.join(a.out, f"checkpoint-{2 * len(trainer.get_train_dataloader())}")
    torch.manual_seed(0)
    fresh = prepare_resume(BertForSequenceClassification(config()), ckpt)
    trainer_for(fresh, os.path.join(a.out, "resumed"), a.epochs)[0].train(resume_from_checkpoint=ckpt)
    exact = all(torch.equal(p, q) for p, q in zip(fresh.state_dict().values(), model.state_dict().values()))
    print(f"resumed from {ckpt}: same final weights {exact}")


if __name__ == "__main__":
    main()
