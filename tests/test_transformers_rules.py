"""transformers' Conv1D (GPT-2's Linear with a transposed weight) and its activation modules have rules
(analysis/transformers_rules.py): a tiny GPT-2's MLP groups (c_fc -> act -> c_proj) are growable, widening
them keeps the logits, and one Firefly step on them runs under the safeguard. Tiny models built from code, on
the CPU; nothing is downloaded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import firefly_descent as ff
from firefly_descent.analysis.rules import rule_for
from firefly_descent.methods import make_grower

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import firefly_descent.analysis.transformers_rules  # noqa: E402, F401 - registers (analyze does it when transformers is imported)

MLP = ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]


def _gpt2() -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _ids(seed: int, n: int = 2) -> torch.Tensor:
    return torch.randint(0, 50, (n, 8), generator=torch.Generator().manual_seed(seed))


def test_conv1d_is_a_transposed_linear():
    m = Conv1D(6, 4)  # nf=6 out, nx=4 in: weight [4, 6]
    rule = rule_for(m)
    assert rule is not None and rule.leaf and rule.linear_map and rule.attrs == ("nf", "nx")
    graph = ff.analyze(torch.nn.Sequential(m, torch.nn.ReLU(), Conv1D(3, 6)), torch.randn(5, 4))
    g = graph["0"]
    assert g.blocked is None and g.width == 6
    members = {(mb.tensor, mb.dim, mb.role) for mb in g.members}
    assert members == {("0.weight", 1, "producer"), ("0.bias", 0, "producer"), ("2.weight", 0, "consumer")}
    assert "[in, out]" in rule.unfold_reason(m)  # the weight-space baselines read a dense weight as [out, in]
    with torch.no_grad():
        m.weight.data = torch.randn(4, 9)
        m.bias.data = torch.randn(9)
    assert not rule.check(m)
    rule.rederive(m, {})
    assert (m.nx, m.nf) == (4, 9) and rule.check(m)


def test_gpt2_mlp_groups_are_growable_and_attention_qkv_split_blocks():
    model = _gpt2()
    graph = ff.analyze(model, _ids(0))
    growable = {g.name: g.width for g in graph.growable()}
    assert {k: growable.get(k) for k in MLP} == {MLP[0]: 128, MLP[1]: 128}
    assert "act" not in " ".join(growable)
    for i in (0, 1):  # c_attn's q/k/v come out of one tensor through `.split(...)`: no rule, blocked with the line
        kind, why = graph[f"transformer.h.{i}.attn.c_attn"].blocked
        assert kind == "UnsupportedOpError" and "method .split()" in why and "modeling_gpt2.py:" in why, why


@pytest.mark.parametrize("mode", ["split", "zero"])
def test_widening_gpt2_mlp_keeps_the_logits(mode):
    model = _gpt2()
    ids = _ids(0)
    with torch.no_grad():
        before = model(ids).logits
    ff.widen(model, (ids,), {MLP[0]: 4, MLP[1]: 4}, mode=mode)
    for blk in model.transformer.h:
        assert (blk.mlp.c_fc.nx, blk.mlp.c_fc.nf) == (32, 132) and tuple(blk.mlp.c_fc.weight.shape) == (32, 132)
        assert (blk.mlp.c_proj.nx, blk.mlp.c_proj.nf) == (132, 32) and tuple(blk.mlp.c_proj.weight.shape) == (132, 32)
    with torch.no_grad():
        after = model(ids).logits
        assert (after - before).abs().max().item() < 1e-5
        assert model(_ids(5, 3)).logits.shape == (3, 8, 50)  # other inputs still run


def _next_token_loss(out, y: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def test_one_firefly_step_on_gpt2_keeps_the_held_out_loss():
    model = _gpt2()
    data = []
    for s in range(6):
        ids = _ids(10 + s, 4)
        data.append((ids, torch.roll(ids, -1, dims=1)))
    widths = [blk.mlp.c_fc.nf for blk in model.transformer.h]
    grower = make_grower("firefly", budget=0.2, seed=0)
    report = grower.grow(model, data, _next_token_loss)
    assert report.outcome in ("accepted", "shrunk", "rolled-back"), report.outcome
    s = report.safety
    assert s.heldout_after["train"] <= s.heldout_before["train"] + 1e-6
    grown = [blk.mlp.c_fc.nf for blk in model.transformer.h]
    for blk in model.transformer.h:
        assert blk.mlp.c_fc.weight.shape[1] == blk.mlp.c_fc.nf == blk.mlp.c_proj.nx == blk.mlp.c_proj.weight.shape[0]
    if report.outcome != "rolled-back":
        assert all(g >= w for g, w in zip(grown, widths)) and grown != widths
    else:
        assert grown == widths
    with torch.no_grad():
        out = model(_ids(99)).logits
    assert out.shape == (2, 8, 50) and torch.isfinite(out).all()
