"""transformers' Conv1D (GPT-2's Linear with a transposed weight) and its activation modules have rules
(analysis/transformers_rules.py): a tiny GPT-2's MLP groups (c_fc -> act -> c_proj) are growable, widening
them keeps the logits, and one Firefly step on them runs under the safeguard. The residual stream widens
exactly too: GPT-2's LayerNorm'd stream with its tied LM head, and Llama's LlamaRMSNorm'd one. Tiny models built
from code, on the CPU; nothing is downloaded."""

from __future__ import annotations

import copy

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


def test_gpt2_mlp_groups_are_growable_and_attention_heads_are_their_own_group():
    model = _gpt2()
    graph = ff.analyze(model, _ids(0))
    growable = {g.name: g.width for g in graph.growable()}
    assert {k: growable.get(k) for k in MLP} == {MLP[0]: 128, MLP[1]: 128}
    assert "act" not in " ".join(growable)
    for i in (0, 1):  # GPT2Attention is kept whole (its `.split(...)` is not traced): one unit per head
        assert growable[f"transformer.h.{i}.attn.heads"] == 2
        assert f"transformer.h.{i}.attn.c_attn" not in graph.groups


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


# ---- the residual stream (issue 23, item 1): LayerNorm (GPT-2) and LlamaRMSNorm, widened exactly -------------
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_gpt2_stream_widens_exactly_and_the_tied_head_stays_tied(dtype, tol):
    model = _gpt2().to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # random gains and biases: a wrong rescale would show
            p.add_(torch.randn_like(p) * 0.05)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids, fresh = _ids(0), _ids(1, 3)
    stream = ff.analyze(model, ids)["transformer.wte"]
    assert stream.growable and {c.kind for c in stream.constraints} == {"layernorm"}
    before, eps = _logits(model, fresh), model.transformer.ln_f.eps
    ff.widen(model, ids, {"transformer.wte": 8}, mode="zero")
    assert (_logits(model, fresh) - before).abs().max().item() < tol
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.shape == (50, 40)
    assert model.transformer.ln_f.eps == pytest.approx(eps * 32 / 40)
    assert model.transformer.h[0].attn.c_attn.nx == 40 and model.transformer.h[1].mlp.c_proj.nf == 40
    wpe = model.transformer.wpe.weight
    torch.testing.assert_close(wpe[:, 32:], wpe[:, :32].mean(1, keepdim=True).expand(-1, 8))
    with pytest.raises(ff.PlanError, match="tied"):  # duplicating would copy and halve the one tied tensor
        ff.widen(model, ids, {"transformer.wte": 40}, mode="split")


def test_widened_gpt2_trains():
    model = _gpt2().train()
    ids = _ids(0, 4)
    ff.widen(model, ids, {"transformer.wte": 8}, mode="zero")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = _next_token_loss(model(ids), torch.roll(ids, -1, dims=1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("tie", [False, True])
def test_llama_rmsnorm_stream_widens_exactly(tie):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids, fresh = _ids(0), _ids(1, 3)
    stream = ff.analyze(model, ids)["model.embed_tokens"]
    assert stream.growable and {c.kind for c in stream.constraints} == {"rmsnorm"}
    before = _logits(model, fresh)
    ff.widen(model, ids, {"model.embed_tokens": 8}, mode="zero")
    assert (_logits(model, fresh) - before).abs().max().item() < 1e-5  # LlamaRMSNorm computes in float32
    assert model.model.norm.variance_epsilon == pytest.approx(cfg.rms_norm_eps * 32 / 40)
    assert model.model.embed_tokens.weight[:, 32:].abs().max() == 0
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie


# ---- new blocks (issue 23, item 2): copies of a GPT-2 / Llama block, exact at zero and causal -------------
def _decoder(family: str) -> tuple[torch.nn.Module, str]:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                      tie_word_embeddings=False)
        cfg._attn_implementation = "eager"
        return transformers.GPT2LMHeadModel(cfg).double().eval(), "transformer.h.0"
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50)
    return transformers.LlamaForCausalLM(cfg).double().eval(), "model.layers.0"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_firefly_block_copies_of_decoders_are_exact_at_zero_and_kept_as_trained(family):
    from firefly_descent.budget import Candidate
    from firefly_descent.methods import Firefly
    from firefly_descent.methods.firefly.depth_candidates import build_depth_candidates

    model, after = _decoder(family)
    x = (_ids(0),)
    graph = ff.analyze(model, *x)
    depth = build_depth_candidates(model, graph, [after], x, 0.5, block="auto")
    assert not depth.skipped and depth.specs[0]["type"] == "copy" and depth.specs[0]["zero"]
    fresh = _ids(1, 3)
    depth.bank.alpha = 0.0
    assert (_logits(depth.net, fresh) - _logits(model, fresh)).abs().max().item() < 1e-12
    depth.bank.alpha = 1.0
    target = _logits(depth.net, fresh)
    assert (target - _logits(model, fresh)).abs().max().item() > 1e-4
    plan = Firefly()._materialize(graph, None, depth, [Candidate("layer", after, 0, -1.0, 1.0)], x)
    ff.apply(model, plan, example_inputs=x, verify=False)
    assert (_logits(model, fresh) - target).abs().max().item() < 1e-10


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_inserted_block_copy_is_causal_and_refuses_cached_decoding(family):
    from firefly_descent.errors import GrowthError
    from firefly_descent.plan import NewLayer, Plan

    model, after = _decoder(family)
    ids = _ids(0, 1)
    # a copy with all its weights (depth stacking: not function-preserving) reads the block's causal mask
    ff.apply(model, Plan(layers=[NewLayer(after, "copy", {"type": "copy", "zero": []})], function_preserving=False),
             example_inputs=(ids,))
    groups = ff.analyze(model, ids).groups  # the grown model is traced again (the next growth step does)
    assert any(name.startswith(after + ".1.") and name.endswith(".heads") for name in groups), list(groups)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 50
    a, b = _logits(model, ids), _logits(model, changed)
    assert (a[0, :-1] - b[0, :-1]).abs().max().item() < 1e-12  # no position reads a later one
    assert (a[0, -1] - b[0, -1]).abs().max().item() > 1e-6
    with torch.no_grad():
        out = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False, use_cache=False)
        assert out.shape == (1, 7)
        with pytest.raises(GrowthError, match="use_cache=False"):
            model.generate(ids[:, :4], max_new_tokens=3, do_sample=False, use_cache=True)


# ---- Firefly's width candidates on GPT-2 are applied as they were scored ----------------------------------
@pytest.mark.parametrize("group,count", [("transformer.h.0.attn.heads", 1), ("transformer.wte", 4)])
def test_gpt2_firefly_width_candidates_apply_as_the_over_grown_copy_computed(group, count):
    """c_attn holds q, k and v rows of each head: each segment keeps its own trained rows (`plan.member_key`),
    so a kept head is the head that was scored. A new stream unit moves off the LayerNorm completion (the
    mean, zero after the norm) by its trained rows, gated: exact off, applied as scored when on."""
    from firefly_descent.budget import Candidate
    from firefly_descent.methods import Firefly
    from firefly_descent.methods.firefly.candidates import build_width_candidates

    model, _ = _decoder("gpt2")
    x, fresh = (_ids(0),), _ids(1, 3)
    graph = ff.analyze(model, *x)
    init = {"split": 0.3, "new_in": 0.5, "new_out": 0.3}
    cands = build_width_candidates(model, graph, [graph[group]], {group: count}, False, x, init,
                                   torch.Generator().manual_seed(0))
    if group == "transformer.wte":  # the stream's producers all take candidate rows: embedding and both c_proj
        assert {"transformer.wte.weight", "transformer.h.0.attn.c_proj.weight"} <= set(cands.new_in[group])
        assert cands.blocks[group] == count  # one candidate: its units move the norms' statistics together
    else:
        assert {k.rpartition("@")[2] for k in cands.new_in[group]} == {"0", "16", "32"}  # q, k, v rows
    cands.bank.alpha = 0.0
    assert (_logits(cands.net, fresh) - _logits(model, fresh)).abs().max().item() < 1e-12
    cands.bank.gates[f"new:{group}"][:] = 1.0
    target = _logits(cands.net, fresh)
    assert (target - _logits(model, fresh)).abs().max().item() > 1e-3
    kept = [Candidate("head" if group == "transformer.wte" else "new", group, j, -1.0, 1.0)
            for j in range(1 if group == "transformer.wte" else count)]
    plan = Firefly()._materialize(graph, cands, None, kept, x)
    off = copy.deepcopy(model)
    ff.apply(off, plan.scaled(0.0), example_inputs=x)  # amplitude 0 (the safeguard's shrink ladder ends there)
    assert (_logits(off, fresh) - _logits(model, fresh)).abs().max().item() < 1e-12
    ff.apply(model, plan, example_inputs=x, verify=False)
    assert (_logits(model, fresh) - target).abs().max().item() < 1e-10


def test_gpt2_stream_candidates_have_a_first_order_score():
    """Before, a new stream unit was the mean of the old ones, zero after every LayerNorm: its gate had no
    gradient and Firefly never grew the stream. Its own rows give it one."""
    model, _ = _decoder("gpt2")
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(8):
        ids = torch.randint(0, 50, (8, 12), generator=g)
        data.append((ids, (3 * ids + 1) % 50))
    grower = make_grower("firefly", budget="params:3000", candidates="width", seed=0)
    grower.grow(model.float(), data, _next_token_loss)
    stream = [c for c in grower.last_scores if c.group == "transformer.wte"]
    assert len(stream) == 1 and abs(stream[0].score) > 1e-4, stream
