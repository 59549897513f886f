"""New attention heads for Hugging Face GPT-2 and Llama (issue 23, item 1): the attention modules are kept whole
and their heads are a group of their own (analysis/transformers_rules.py), one unit per head, or per key/value
head with its query heads under grouped-query attention. New heads (any q/k/v rows, zero output columns) keep the
logits, the grown model trains with its optimizer state remapped, undo and replay are exact, and Firefly proposes
whole heads in one budget with the other groups. Tiny models built from configs, on the CPU; nothing downloaded."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from zoo import jitter

import firefly_descent as ff
from firefly_descent.analysis.rules import rule_for
from firefly_descent.engine import apply_undoable, check_attrs
from firefly_descent.methods import make_grower
from firefly_descent.methods.firefly.candidates import block_size, build_width_candidates, splittable
from firefly_descent.plan import GroupChange, NewUnits, Plan, Split

transformers = pytest.importorskip("transformers")

V, T = 50, 8
GPT2_HEADS = ["transformer.h.0.attn.heads", "transformer.h.1.attn.heads"]
LLAMA_HEADS = ["model.layers.0.self_attn.heads", "model.layers.1.self_attn.heads"]


def _gpt2(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=16)
    return jitter(transformers.GPT2LMHeadModel(cfg), dtype)


def _llama(kv: int = 2, bias: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv, vocab_size=V, attention_bias=bias)
    return jitter(transformers.LlamaForCausalLM(cfg), dtype)




def _ids(seed: int, n: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _heads_plan(model: torch.nn.Module, groups: dict[str, int], ids: torch.Tensor) -> Plan:
    """New heads with random q/k/v rows and zero output-projection columns (the default outgoing values)."""
    graph = ff.analyze(model, ids)
    return Plan([GroupChange(graph[g], new=NewUnits(n, init="random")) for g, n in groups.items()],
                input_shapes=[list(ids.shape)])


def _next_token_loss(out, y: torch.Tensor) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


# ---- exactness ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_gpt2_new_heads_are_exact_and_its_attributes_follow(dtype, tol):
    model = _gpt2(dtype)
    ids, fresh = _ids(0), _ids(1, 3)
    graph = ff.analyze(model, ids)
    heads = graph[GPT2_HEADS[0]]
    assert heads.growable and heads.width == 4 and heads.constraints == []
    assert block_size(heads) == 1 and splittable(heads)  # a unit is a whole head: new heads and duplicates
    before = _logits(model, fresh)
    ff.apply(model, _heads_plan(model, {GPT2_HEADS[0]: 2, GPT2_HEADS[1]: 1}, ids), example_inputs=(ids,))
    drift = (_logits(model, fresh) - before).abs().max().item()
    assert drift < tol, drift
    a0, a1 = model.transformer.h[0].attn, model.transformer.h[1].attn
    assert (a0.num_heads, a0.split_size, a0.embed_dim, a0.head_dim) == (6, 48, 32, 8)
    assert (a1.num_heads, a1.split_size) == (5, 40)
    assert tuple(a0.c_attn.weight.shape) == (32, 144) and tuple(a0.c_proj.weight.shape) == (48, 32)
    assert a0.c_attn.weight[:, 32:48].abs().max() > 0 and a0.c_attn.weight[:, 128:].abs().max() > 0  # new q, v
    assert a0.c_proj.weight[32:].abs().max() == 0 and check_attrs(model) == []
    assert ff.analyze(model, ids)[GPT2_HEADS[0]].width == 6  # grows again from what it is now


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_llama_gqa_grows_by_a_kv_head_with_its_query_heads_exactly(dtype, tol):
    model = _llama(kv=2, dtype=dtype)
    ids, fresh = _ids(0), _ids(1, 3)
    heads = ff.analyze(model, ids)[LLAMA_HEADS[0]]
    assert heads.growable and heads.width == 2  # two key/value heads, each with 2 query heads
    inner = {m.tensor.split(".")[-2]: m.inner for m in heads.members}
    assert inner == {"q_proj": 16, "k_proj": 8, "v_proj": 8, "o_proj": 16}
    before = _logits(model, fresh)
    ff.apply(model, _heads_plan(model, {LLAMA_HEADS[0]: 1, LLAMA_HEADS[1]: 2}, ids), example_inputs=(ids,))
    drift = (_logits(model, fresh) - before).abs().max().item()
    assert drift < tol, drift
    a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    assert (a0.q_proj.out_features, a0.k_proj.out_features, a0.v_proj.out_features, a0.o_proj.in_features) == (
        48, 24, 24, 48)  # one KV head + 2 query heads of 8
    assert (a1.q_proj.out_features, a1.k_proj.out_features) == (64, 32)
    assert a0.num_key_value_groups == 2 and a0.head_dim == 8 and check_attrs(model) == []
    assert a0.o_proj.weight[:, 32:].abs().max() == 0 and a0.k_proj.weight[16:].abs().max() > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_llama_without_gqa_grows_by_heads_exactly_with_biases(dtype, tol):
    model = _llama(kv=4, bias=True, dtype=dtype)
    ids, fresh = _ids(0), _ids(1, 3)
    heads = ff.analyze(model, ids)[LLAMA_HEADS[0]]
    assert heads.width == 4 and {m.inner for m in heads.members} == {8}
    before = _logits(model, fresh)
    ff.apply(model, _heads_plan(model, {LLAMA_HEADS[0]: 1, LLAMA_HEADS[1]: 3}, ids), example_inputs=(ids,))
    drift = (_logits(model, fresh) - before).abs().max().item()
    assert drift < tol, drift
    a0 = model.model.layers[0].self_attn
    assert a0.q_proj.bias.shape == (40,) and a0.k_proj.bias.shape == (40,) and a0.num_key_value_groups == 1
    assert check_attrs(model) == []


def test_a_duplicated_head_with_halved_output_columns_is_exact():
    model, ids, fresh = _gpt2(torch.float64), _ids(0), _ids(1, 3)
    before = _logits(model, fresh)
    graph = ff.analyze(model, ids)
    ff.apply(model, Plan([GroupChange(graph[GPT2_HEADS[1]], splits=[Split(2)])]), example_inputs=(ids,))
    assert (_logits(model, fresh) - before).abs().max().item() < 1e-12
    assert model.transformer.h[1].attn.num_heads == 5


def test_heads_and_the_stream_grow_in_one_plan_exactly():
    model, ids, fresh = _llama(kv=2, dtype=torch.float64), _ids(0), _ids(1, 3)
    before = _logits(model, fresh)
    ff.widen(model, ids, {"model.embed_tokens": 8, LLAMA_HEADS[0]: 1}, mode="zero")
    assert (_logits(model, fresh) - before).abs().max().item() < 1e-6  # LlamaRMSNorm computes in float32
    a0 = model.model.layers[0].self_attn
    assert tuple(a0.q_proj.weight.shape) == (48, 40) and tuple(a0.o_proj.weight.shape) == (40, 48)
    gpt = _gpt2(torch.float64)
    before = _logits(gpt, fresh)
    ff.widen(gpt, ids, {"transformer.wte": 8, GPT2_HEADS[1]: 2}, mode="zero")
    assert (_logits(gpt, fresh) - before).abs().max().item() < 1e-12
    a1 = gpt.transformer.h[1].attn
    assert (a1.embed_dim, a1.split_size, a1.num_heads, a1.c_attn.nx) == (40, 48, 6, 40) and check_attrs(gpt) == []


def test_gpt2_cross_attention_is_refused_with_the_reason():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=V)
    why = rule_for(GPT2Attention(cfg, is_cross_attention=True)).refuse(GPT2Attention(cfg, is_cross_attention=True))
    assert why is not None and "cross-attention" in why


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_grown_heads_generate_the_same_tokens_through_the_kv_cache(family):
    """The cache holds each layer's own head count: greedy decoding is unchanged by new heads."""
    model = _gpt2() if family == "gpt2" else _llama(kv=2)
    groups = GPT2_HEADS if family == "gpt2" else LLAMA_HEADS
    prompt = _ids(0)[:1, :4]
    before = model.generate(prompt, max_new_tokens=5, do_sample=False)
    ff.widen(model, _ids(0), {groups[0]: 1, groups[1]: 2}, mode="zero")
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), before)


# ---- training, undo, replay -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_grown_heads_train_with_remapped_optimizer_state(family):
    model = (_gpt2() if family == "gpt2" else _llama(kv=2)).train()
    groups = GPT2_HEADS if family == "gpt2" else LLAMA_HEADS
    ids = _ids(0, 4)
    y = torch.roll(ids, -1, dims=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _next_token_loss(model(ids), y).backward()
    opt.step()
    opt.zero_grad()
    ff.apply(model, _heads_plan(model, {groups[0]: 1, groups[1]: 1}, ids), opt, (ids,))
    for p in model.parameters():
        assert opt.state[p]["momentum_buffer"].shape == p.shape
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = _next_token_loss(model(ids), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    if family == "gpt2":
        new_cols = model.transformer.h[0].attn.c_proj.weight[32:]
    else:
        new_cols = model.model.layers[0].self_attn.o_proj.weight[:, 32:]
    assert new_cols.abs().max() > 0  # the new heads' output columns learn


def test_undo_restores_weights_attributes_and_optimizer_state_exactly():
    model, ids = _gpt2(), _ids(0, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _next_token_loss(model(ids), torch.roll(ids, -1, dims=1)).backward()
    opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    attn = model.transformer.h[0].attn
    undo = apply_undoable(model, _heads_plan(model, {GPT2_HEADS[0]: 2}, ids), opt, (ids,))
    assert attn.num_heads == 6 and attn.split_size == 48
    undo()
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf, attn.c_proj.nx) == (4, 32, 96, 32)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert all(torch.equal(opt.state[p]["exp_avg"], state[n]) for n, p in model.named_parameters())
    assert check_attrs(model) == []


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_grown_heads_save_and_replay_from_the_original_config(family, tmp_path):
    def build() -> torch.nn.Module:
        return _gpt2() if family == "gpt2" else _llama(kv=2)

    model, ids, fresh = build(), _ids(0), _ids(1, 3)
    groups = GPT2_HEADS if family == "gpt2" else LLAMA_HEADS
    ff.widen(model, ids, {groups[0]: 1}, mode="zero")
    ff.widen(model, ids, {groups[0]: 1, groups[1]: 1}, mode="zero")
    ff.save(model, str(tmp_path / "grown.pt"))
    back = ff.load(str(tmp_path / "grown.pt"), build)
    assert (_logits(back, fresh) - _logits(model, fresh)).abs().max().item() == 0.0
    assert check_attrs(back) == []
    if family == "gpt2":
        assert back.transformer.h[0].attn.num_heads == 6 and back.transformer.h[0].attn.split_size == 48
    else:
        assert back.model.layers[0].self_attn.q_proj.out_features == 64  # 2 new KV groups of 2 query heads


@pytest.mark.parametrize("history", [True, False])
def test_grown_gpt2_heads_reload_with_save_pretrained(history, tmp_path):
    """`integrations.hf.load_grown`: with the history replayed, or from the saved shapes alone (the attention's
    `split_size` follows its resized `c_attn` there too)."""
    import json

    from firefly_descent.integrations.hf import load_grown, save_history

    model, ids = _gpt2(), _ids(0)
    ff.widen(model, ids, {GPT2_HEADS[0]: 1, GPT2_HEADS[1]: 2}, mode="zero")
    model.save_pretrained(str(tmp_path))
    if history:
        save_history(model, str(tmp_path))
    else:
        cfg = json.loads((tmp_path / "config.json").read_text())
        cfg.pop("firefly_history", None)
        (tmp_path / "config.json").write_text(json.dumps(cfg))
    back = load_grown(str(tmp_path), _gpt2)
    assert (_logits(back, ids) - _logits(model, ids)).abs().max().item() == 0.0
    assert [b.attn.split_size for b in back.transformer.h] == [40, 48] and check_attrs(back) == []


# ---- Firefly ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_firefly_head_candidates_are_whole_heads_exact_when_off(family):
    model = _gpt2(torch.float64) if family == "gpt2" else _llama(kv=2, dtype=torch.float64)
    groups = GPT2_HEADS if family == "gpt2" else LLAMA_HEADS
    ids, fresh = (_ids(0),), _ids(1, 3)
    graph = ff.analyze(model, *ids)
    stream = "transformer.wte" if family == "gpt2" else "model.embed_tokens"  # (tested in test_stream_width)
    cands = [g for g in graph.growable() if block_size(g) is not None and g.name != stream]
    assert set(groups) <= {g.name for g in cands}
    init = {"split": 0.3, "new_in": 0.5, "new_out": 0.3}
    wc = build_width_candidates(model, graph, cands, {g.name: 2 for g in cands}, True, ids, init,
                                torch.Generator().manual_seed(0))
    assert wc.bank.gates[f"new:{groups[0]}"].numel() == 2  # one gate per whole head (KV group)
    wc.bank.alpha = 0.0
    with torch.no_grad():
        assert (wc.net(fresh).logits - _logits(model, fresh)).abs().max().item() < 1e-12
    wc.bank.alpha = 1.0
    with torch.no_grad():
        assert (wc.net(fresh).logits - _logits(model, fresh)).abs().max().item() > 1e-6


def _shift_task(seed: int = 0, n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Next token of counting sequences (token t+1 = token t + 1 mod V): learnable by attending to the last token."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        start = torch.randint(0, V, (8, 1), generator=g)
        seq = (start + torch.arange(T + 1)) % V
        data.append((seq[:, :-1], seq[:, 1:]))
    return data


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_firefly_step_proposes_heads_in_one_budget_and_keeps_the_held_out_loss(family):
    model = _gpt2() if family == "gpt2" else _llama(kv=2)
    groups = GPT2_HEADS if family == "gpt2" else LLAMA_HEADS
    data = _shift_task()
    ref = copy.deepcopy(model)
    grower = make_grower("firefly", budget="ratio:0.5", per_group=True, seed=0)
    decided = []
    decide = grower.decide
    grower.decide = lambda ctx: decided.append(decide(ctx)) or decided[-1]  # keep the plan Firefly chose
    x = (data[0][0][:2],)
    report = grower.grow(model, data, _next_token_loss, example_inputs=x)
    pool = report.extra["pool"]
    assert all(g in pool and pool[g]["new"] > 0 for g in groups), pool  # whole heads are candidates
    s = report.safety
    assert s.outcome in ("accepted", "shrunk", "rolled-back"), s.outcome
    assert s.heldout_after["train"] <= s.heldout_before["train"] + 1e-6
    assert check_attrs(model) == []
    fresh = _ids(7, 3)
    if s.outcome == "rolled-back":
        assert (_logits(model, fresh) - _logits(ref, fresh)).abs().max().item() == 0.0
    with torch.no_grad():
        assert torch.isfinite(model(fresh).logits).all()
    plan = getattr(decided[0], "plan", decided[0])
    assert any(ch.group.name in groups and ch.new is not None for ch in plan.changes)  # it chose new heads
    off = copy.deepcopy(ref)
    ff.apply(off, plan.scaled(0.0), example_inputs=x)  # the chosen plan at amplitude 0: the same function
    assert (_logits(off, fresh) - _logits(ref, fresh)).abs().max().item() < 1e-5


# ---- BERT and ViT (Hugging Face) --------------------------------------------------------------------------------
def _bert(dtype: torch.dtype) -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return jitter(transformers.BertForSequenceClassification(cfg), dtype)


def _vit(dtype: torch.dtype) -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, num_labels=3)
    return jitter(transformers.ViTForImageClassification(cfg), dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_bert_new_heads_are_exact_under_its_post_norm(dtype, tol):
    model, x, fresh = _bert(dtype), _ids(0), _ids(1, 3)
    heads = [f"bert.encoder.layer.{i}.attention.self.heads" for i in (0, 1)]
    graph = ff.analyze(model, x)
    assert graph[heads[0]].width == 4 and graph["bert.encoder.layer.0.attention.self.head_dim"].on_request
    before = _logits(model, fresh)
    ff.apply(model, _heads_plan(model, {heads[0]: 2, heads[1]: 1}, x), example_inputs=(x,))
    drift = (_logits(model, fresh) - before).abs().max().item()
    assert drift < tol, drift
    a = model.bert.encoder.layer[0].attention
    assert (a.self.num_attention_heads, a.self.all_head_size, a.output.dense.in_features) == (6, 48, 48)
    assert check_attrs(model) == []


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_vit_new_heads_are_exact(dtype, tol):
    model = _vit(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))
    fresh = torch.randn(3, 3, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(1))
    heads = ["vit.layers.0.attention.heads", "vit.layers.1.attention.heads"]
    before = _logits(model, fresh)
    ff.apply(model, _heads_plan(model, {heads[0]: 1, heads[1]: 2}, x), example_inputs=(x,))
    drift = (_logits(model, fresh) - before).abs().max().item()
    assert drift < tol, drift
    a = model.vit.layers[1].attention
    assert a.num_attention_heads == 6 and a.q_proj.out_features == 48 and check_attrs(model) == []


@pytest.mark.parametrize("method", ["gradmax", "splitting-fast", "tiny"])
def test_neuron_growers_skip_heads_saying_a_unit_is_a_head(method):
    """GradMax, splitting and TINY grow single neurons: they skip a heads group, and the report says why (a unit is a
    block of head_dim rows), not that the group has several producers."""
    model, ids = _gpt2(), _ids(0, n=4)
    report = make_grower(method, budget=0.35).grow(model, [(ids, ids)], _next_token_loss, example_inputs=(ids,))
    skipped = report.extra["skipped_groups"]
    for name in GPT2_HEADS:
        reason = "each unit is a block of 8 rows (an attention head), not one neuron"
        assert skipped[name] == f"{method} does not apply: {reason}"


# ---- more families: Mistral and Qwen2 (Llama-shaped), RoBERTa (BERT-shaped); BERT is post-norm ----------------
def _family(name: str) -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "mistral":
        cfg = transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=V)
        return jitter(transformers.MistralForCausalLM(cfg), torch.float64)
    if name == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=V)
        return jitter(transformers.Qwen2ForCausalLM(cfg), torch.float64)
    if name in ("qwen3", "gemma"):  # Qwen3: q_norm/k_norm per head; Gemma: norms multiply by 1 + weight
        config = transformers.Qwen3Config if name == "qwen3" else transformers.GemmaConfig
        cfg = config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=V)
        cfg._attn_implementation = "eager"
        return jitter(transformers.AutoModelForCausalLM.from_config(cfg), torch.float64)
    cfg = transformers.RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=20, num_labels=3)
    return jitter(transformers.RobertaForSequenceClassification(cfg), torch.float64)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "gemma", "roberta"])
def test_more_families_grow_heads_head_dim_ffn_and_stream_exactly(family):
    model, x, fresh = _family(family), _ids(0) % (V - 3) + 3, _ids(1, 3) % (V - 3) + 3  # RoBERTa: 0-2 special
    if family == "roberta":
        attn, ffn = "roberta.encoder.layer.0.attention.self", "roberta.encoder.layer.1.intermediate.dense"
        stream, stream_tol = "roberta.embeddings.word_embeddings", None  # post-norm: duplication only
    else:
        attn, ffn = "model.layers.0.self_attn", "model.layers.1.mlp.gate_proj"
        stream, stream_tol = "model.embed_tokens", 1e-6  # the RMSNorm computes in float32
    before = _logits(model, fresh)
    if family == "qwen3":  # its per-head norms over the head dims refuse head_dim, with the reason
        with pytest.raises(ff.GrowthError, match="q_norm/k_norm normalise each head's dims"):
            ff.widen(model, x, {f"{attn}.head_dim": 2}, mode="zero")
    for sizes, tol in (({f"{attn}.heads": 1}, 1e-12), ({f"{attn}.head_dim": 2}, 1e-12), ({ffn: 4}, 1e-12)):
        if family == "qwen3" and "head_dim" in next(iter(sizes)):
            continue
        ff.widen(model, x, sizes, mode="zero")
        assert (_logits(model, fresh) - before).abs().max().item() < tol, sizes
    if stream_tol is None:
        with pytest.raises(ff.GrowthError, match="post-norm block 'roberta.embeddings'"):
            ff.widen(model, x, {stream: 4}, mode="zero")
        ff.widen(model, x, {stream: 32}, mode="split")  # every unit duplicated once: exact
        stream_tol = 1e-12
    else:
        ff.widen(model, x, {stream: 4}, mode="zero")
    assert (_logits(model, fresh) - before).abs().max().item() < stream_tol
    assert check_attrs(model) == []
    if family == "gemma":  # its norms multiply by 1 + weight: a new unit's gain is 1, its weight 0
        assert model.model.norm.weight.shape[0] == 36 and model.model.norm.weight[32:].abs().max().item() == 0.0


def test_bert_post_norm_stream_and_block_copies_are_refused_with_the_reason():
    """BERT normalises after every residual add: a new stream unit would have to be the mean of the normalised
    units (used to be applied, off by the norm's gains and biases), and a copied layer with zero branches still
    renormalises the stream (used to be a depth candidate)."""
    model, x = _bert(torch.float64), _ids(0)
    with pytest.raises(ff.GrowthError, match="post-norm block 'bert.embeddings'"):
        ff.widen(model, x, {"bert.embeddings.word_embeddings": 4}, mode="zero")
    with pytest.raises(ff.GrowthError, match="post-norm"):
        ff.add_blocks(model, x, ["bert.encoder.layer.0"])
    from firefly_descent.methods.firefly.depth_candidates import is_attention_block

    assert not is_attention_block(ff.analyze(model, x), model, "bert.encoder.layer.0")


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_clip_and_siglip_vision_attention_grow_heads_and_head_dim_exactly(family):
    """Llama-shaped attentions with an `out_proj` and a `scale` (LlamaAttentionRule(out="out_proj"))."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config, model = {"clip": (transformers.CLIPVisionConfig, transformers.CLIPVisionModel),
                     "siglip": (transformers.SiglipVisionConfig, transformers.SiglipVisionModel)}[family]
    cfg = config(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                 patch_size=8)
    cfg._attn_implementation = "eager"
    model = jitter(model(cfg), torch.float64)
    gen = torch.Generator().manual_seed(0)
    x, fresh = (torch.randn(n, 3, 16, 16, dtype=torch.float64, generator=gen) for n in (2, 3))

    def out(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(pixel_values=fresh).last_hidden_state

    before = out(model)
    ff.widen(model, x, {"encoder.layers.0.self_attn.heads": 1}, mode="zero")
    ff.widen(model, x, {"encoder.layers.1.self_attn.head_dim": 2}, mode="zero")
    attn = model.get_submodule("encoder.layers.1.self_attn")
    assert (attn.num_heads, attn.head_dim, attn.scale) == (2, 10, pytest.approx(10 ** -0.5))
    assert model.get_submodule("encoder.layers.0.self_attn").num_heads == 3 and check_attrs(model) == []
    assert (out(model) - before).abs().max().item() < 1e-12


def test_siglip_attention_pooling_head_grows_with_the_stream():
    """SigLIP pools with an nn.MultiheadAttention whose query is a parameter (`probe`, repeated over the batch): the
    probe follows the stream as an added member, so the stream (a head more in the pooling attention) and its
    head_dim grow exactly."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            cfg = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=16, patch_size=8)
            cfg._attn_implementation = "eager"
            self.enc, self.fc = transformers.SiglipVisionModel(cfg), torch.nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.enc(pixel_values=x).pooler_output)

    model = jitter(Classifier(), torch.float64)
    gen = torch.Generator().manual_seed(0)
    x, fresh = (torch.randn(n, 3, 16, 16, dtype=torch.float64, generator=gen) for n in (2, 3))
    with torch.no_grad():
        before = model(fresh)
    ff.widen(model, x, {"enc.embeddings.patch_embedding": 8}, mode="zero")
    ff.widen(model, x, {"enc.head.attention.head_dim": 2}, mode="zero")
    pool = model.enc.head.attention
    assert (pool.num_heads, pool.head_dim, model.enc.head.probe.shape[-1]) == (3, 10, 30) and check_attrs(model) == []
    with torch.no_grad():
        assert (model(fresh) - before).abs().max().item() < 1e-12


def test_phi3_grows_head_dim_its_glu_and_stream_exactly_and_says_why_not_heads():
    """Phi-3: fused qkv_proj sliced by the config's head count (whole heads refused, with the reason), a GLU MLP
    written with `chunk`, RMSNorm stream, rotary head_dim by pairs."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.Phi3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                  pad_token_id=0)
    cfg._attn_implementation = "eager"
    model = jitter(transformers.AutoModelForCausalLM.from_config(cfg), torch.float64)
    x, fresh = _ids(0), _ids(1, 3)
    why = ff.analyze(model, x)["model.layers.0.self_attn.heads"].blocked
    assert why is not None and "config's head count" in why[1]
    before = _logits(model, fresh)
    ff.widen(model, x, {"model.rotary_emb.head_dim": 2, "model.layers.0.mlp.gate_up_proj": 3}, mode="zero")
    assert (_logits(model, fresh) - before).abs().max().item() < 1e-12
    ff.widen(model, x, {"model.embed_tokens": 4}, mode="zero")
    assert (_logits(model, fresh) - before).abs().max().item() < 1e-6  # the RMSNorm computes in float32
    attn = model.model.layers[1].self_attn
    assert attn.head_dim == 12 and attn.qkv_proj.out_features == 96 and check_attrs(model) == []
