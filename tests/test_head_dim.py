"""Growing the dims of every attention head (issue 23, item 1: Gesmundo & Maile's key/query and value expansions,
which these modules tie to one `head_dim`): `<attention>.head_dim` grows exactly on Hugging Face GPT-2, BERT and
ViT, timm's ViT (fused and manual softmax, gated) and Swin, and the library's own `HeadAttention`, by new dims
(zero key rows, zero output columns) or by splits (key rows halved), with the query rows rescaled to the module's
new 1/sqrt(head_dim); Llama's by rotated pairs in every layer at once (its rotary embedding is shared). What cannot
grow (a dynamic rope, nn.MultiheadAttention) says why. Tiny models built from configs on the CPU; nothing
downloaded."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import jitter

import firefly_descent as ff
from firefly_descent.engine import apply_undoable, check_attrs
from firefly_descent.errors import PlanError
from firefly_descent.methods import make_grower
from firefly_descent.models.transformer import Transformer
from firefly_descent.plan import GroupChange, NewUnits, Plan

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

torch.set_num_threads(1)
V, T = 50, 8




def _ids(seed: int, n: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def _images(seed: int, size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _gpt2(**kw):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=16, **kw)
    return transformers.GPT2LMHeadModel(cfg), "transformer.h.1.attn", "head_dim", _ids


def _bert():
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return (transformers.BertForSequenceClassification(cfg), "bert.encoder.layer.1.attention.self",
            "attention_head_size", _ids)


def _hf_vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, num_labels=3)
    return transformers.ViTForImageClassification(cfg), "vit.layers.0.attention", "head_dim", lambda s: _images(s, 8)


def _timm_vit(fused: bool):
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
                          num_heads=4, num_classes=3, qkv_bias=True)
    for blk in m.blocks:
        blk.attn.fused_attn = fused
    return m, "blocks.1.attn", "head_dim", lambda s: _images(s, 32)


class _Gated(nn.Module):
    """timm's gated Attention between two Linears."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import Attention

        self.inp = nn.Linear(6, 16)
        self.attn = Attention(16, num_heads=2, qkv_bias=True, gated=True)
        self.out = nn.Linear(16, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(self.inp(t)))


def _swin():
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4, embed_dim=16,
                          depths=(1, 1), num_heads=(2, 4), window_size=4, num_classes=3)
    return m, "layers.1.blocks.0.attn", None, lambda s: _images(s, 32)


def _ours():
    m = Transformer(in_features=4, seq_len=5, num_classes=3, d_model=6, depth=1, num_heads=2, head_dim=3,
                    mlp_hidden=4)
    return m, "blocks.0.attn", "head_dim", lambda s: torch.randn(3, 5, 4, dtype=torch.float64,
                                                                   generator=torch.Generator().manual_seed(s))


FAMILIES = {
    "gpt2": lambda: _gpt2(),
    "gpt2-unscaled": lambda: _gpt2(scale_attn_weights=False),
    "gpt2-by-layer": lambda: _gpt2(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    "bert": _bert,
    "hf-vit": _hf_vit,
    "timm-vit-fused": lambda: _timm_vit(True),
    "timm-vit-manual": lambda: _timm_vit(False),
    "timm-gated": lambda: (_Gated(), "attn", "head_dim", lambda s: torch.randn(
        2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(s))),
    "swin": _swin,
    "ours": _ours,
}


def _build(family: str):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model, attn, attr, inputs = FAMILIES[family]()
    return jitter(model), attn, attr, inputs


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _head_dim(model: nn.Module, attn: str, attr: str | None) -> int:
    m = model.get_submodule(attn)
    return getattr(m, attr) if attr else m.proj.in_features // m.num_heads


@pytest.mark.parametrize("mode", ["zero", "split"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_head_dim_grows_exactly_and_the_attributes_follow(family, mode):
    model, attn, attr, inputs = _build(family)
    x, fresh = inputs(0), inputs(1)
    before, old = _out(model, fresh), _head_dim(model, attn, attr)
    heads_before = model.get_submodule(attn).state_dict()
    ff.widen(model, x, {f"{attn}.head_dim": 3}, mode=mode)
    drift = (_out(model, fresh) - before).abs().max().item()
    assert drift < 1e-10, drift
    assert _head_dim(model, attn, attr) == old + 3 and check_attrs(model) == []
    grown = model.get_submodule(attn).state_dict()
    assert any(grown[k].shape != v.shape for k, v in heads_before.items())
    scale = next((getattr(model.get_submodule(attn), a) for a in ("scaling", "scale")
                  if isinstance(getattr(model.get_submodule(attn), a, None), float)), None)
    if scale is not None and family != "gpt2-unscaled":  # the scale attribute is the new head_dim's
        layer = 2.0 if family == "gpt2-by-layer" else 1.0
        assert scale == pytest.approx((old + 3) ** -0.5 / layer)


def test_each_part_of_the_completion_is_needed():
    """Not exact by accident: new key rows made nonzero, or the query rows' rescaling taken back, move the output."""
    model, attn, _, inputs = _build("ours")
    x, fresh = inputs(0), inputs(1)
    before = _out(model, fresh)
    ff.widen(model, x, {f"{attn}.head_dim": 2}, mode="zero")
    m = model.get_submodule(attn)
    hd = m.head_dim
    new_rows = [h * hd + j for h in range(m.num_heads) for j in (hd - 2, hd - 1)]
    old_rows = [r for r in range(m.wq.shape[0]) if r not in new_rows]
    assert m.wk[new_rows].abs().max().item() == 0.0 and m.wo[:, new_rows].abs().max().item() == 0.0
    assert m.wq[new_rows].abs().max().item() > 0 and m.wv[new_rows].abs().max().item() > 0  # drawn, not zero
    for edit in ("key", "query"):
        probe = copy.deepcopy(model)
        pm = probe.get_submodule(attn)
        with torch.no_grad():
            if edit == "key":
                pm.wk[new_rows] = 0.5
            else:
                pm.wq[old_rows] /= math.sqrt(hd / (hd - 2))
                pm.bq[old_rows] /= math.sqrt(hd / (hd - 2))
        assert (_out(probe, fresh) - before).abs().max().item() > 1e-4, edit


def test_grown_head_dims_learn_and_undo_restores_everything():
    model, attn, attr, inputs = _build("bert")
    x = inputs(0)
    y = torch.tensor([0, 2])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    F.cross_entropy(model(x).logits, y).backward()
    opt.step()
    opt.zero_grad()
    ref, ref_opt = copy.deepcopy(model), copy.deepcopy(opt.state_dict())

    def plan() -> Plan:
        graph = ff.analyze(model, x)
        return Plan([GroupChange(graph[f"{attn}.head_dim"], new=NewUnits(4, init="random"))],
                    input_shapes=[list(x.shape)])

    apply_undoable(model, plan(), opt, example_inputs=(x,))()  # grown, then taken back at once
    a, b = model.get_submodule(attn), ref.get_submodule(attn)
    assert (a.attention_head_size, a.num_attention_heads, a.all_head_size, a.scaling) == (
        b.attention_head_size, b.num_attention_heads, b.all_head_size, b.scaling)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), ref.state_dict().values()))
    assert all(torch.equal(s["exp_avg"], r["exp_avg"])
               for s, r in zip(opt.state_dict()["state"].values(), ref_opt["state"].values()))

    ff.apply(model, plan(), opt, example_inputs=(x,))
    m = model.get_submodule(attn)
    assert (m.attention_head_size, m.num_attention_heads, m.all_head_size) == (12, 4, 48)
    model.train()
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(x).logits, y)
        loss.backward()
        if not losses:
            new_keys = [h * 12 + j for h in range(4) for j in range(8, 12)]
            assert m.key.weight.grad[new_keys].abs().sum().item() > 0  # the new dims learn
        losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]


def test_heads_and_head_dim_grow_in_separate_plans_only():
    model, attn, _, inputs = _build("timm-vit-fused")
    x, fresh = inputs(0), inputs(1)
    before = _out(model, fresh)
    graph = ff.analyze(model, x)
    both = Plan([GroupChange(graph[f"{attn}.heads"], new=NewUnits(1, init="random")),
                 GroupChange(graph[f"{attn}.head_dim"], new=NewUnits(2, init="random"))],
                input_shapes=[list(x.shape)])
    with pytest.raises(PlanError, match="separate plans"):
        ff.apply(model, both, example_inputs=(x,))
    ff.widen(model, x, {f"{attn}.heads": 1}, mode="zero")
    ff.widen(model, x, {f"{attn}.head_dim": 2}, mode="zero")
    m = model.get_submodule(attn)
    assert (m.num_heads, m.head_dim, m.qkv.out_features) == (5, 10, 150)
    assert (_out(model, fresh) - before).abs().max().item() < 1e-10 and check_attrs(model) == []


def test_growers_grow_head_dim_only_when_named():
    model, attn, _, inputs = _build("gpt2")
    x = _ids(0, 4)
    graph = ff.analyze(model, x)
    name = f"{attn}.head_dim"
    assert graph[name].growable and graph[name].on_request
    assert name not in {g.name for g in graph.growable()} and name in {g.name for g in graph.growable(True)}

    def loss(out, y):
        return F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1))

    before = _out(model, _ids(1))
    plain = copy.deepcopy(model)
    make_grower("random", budget=0.3, seed=0).grow(plain, [(x, x)], loss, example_inputs=(x,))
    assert plain.get_submodule(attn).head_dim == 8  # left alone unless named
    named = make_grower("random", budget=0.3, seed=0, groups=[name])
    report = named.grow(model, [(x, x)], loss, example_inputs=(x,))
    grown = model.get_submodule(attn)
    assert grown.head_dim > 8 and report.extra.get("skipped_groups", {}) == {}
    assert (_out(model, _ids(1)) - before).abs().max().item() < 1e-10  # random growth is function-preserving


def _llama(kv: int, **kw) -> nn.Module:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv, vocab_size=V, attention_bias=True, **kw)
    return jitter(transformers.LlamaForCausalLM(cfg))


@pytest.mark.parametrize("mode", ["zero", "split"])
@pytest.mark.parametrize("kv", [4, 2])
def test_llama_head_dim_grows_by_rotated_pairs_in_every_layer_at_once(kv, mode):
    """The rotary embedding is shared, so its pairs group joins every layer's head_dim: a unit is a pair of dims
    (i, i + head_dim/2) in every head of every layer, grown in both halves, its frequency continuing the old ones."""
    model, x, fresh = _llama(kv), _ids(0), _ids(1, 3)
    graph = ff.analyze(model, x)
    pairs = graph["model.rotary_emb.head_dim"]
    assert pairs.width == 4 and pairs.on_request and not any(n.startswith("model.layers") and n.endswith("head_dim")
                                                              for n in graph.groups)
    old_freq = model.model.rotary_emb.inv_freq.clone()
    before = _out(model, fresh)
    ff.widen(model, x, {"model.rotary_emb.head_dim": 2}, mode=mode)
    assert (_out(model, fresh) - before).abs().max().item() < 1e-10
    freq = model.model.rotary_emb.inv_freq
    assert torch.equal(freq[:4], old_freq)
    if mode == "zero":  # new pairs rotate slower than every old one, continuing the sequence
        ratio = old_freq[-1] / old_freq[-2]
        assert torch.allclose(freq[4:], old_freq[-1] * ratio ** torch.arange(1, 3, dtype=freq.dtype))
    assert torch.equal(model.model.rotary_emb.original_inv_freq, freq)
    for layer in model.model.layers:
        a = layer.self_attn
        assert (a.head_dim, a.q_proj.out_features, a.k_proj.out_features) == (12, 48, 12 * kv)
        assert a.scaling == pytest.approx(12 ** -0.5)
    assert check_attrs(model) == []


def test_llama_new_pairs_sit_in_both_halves_of_each_head():
    """Where the new dims go matters: a new key dim (nonzero) changes the output, and the old dims keep their
    partner (rotate_half pairs dim i with i + head_dim/2): rows 0-3 and 6-9 of each head are the old ones."""
    model, x, fresh = _llama(2), _ids(0), _ids(1, 3)
    old_k = model.model.layers[0].self_attn.k_proj.weight.clone()
    ff.widen(model, x, {"model.rotary_emb.head_dim": 2}, mode="zero")
    k = model.model.layers[0].self_attn.k_proj.weight
    for h in range(2):
        assert torch.equal(k[h * 12: h * 12 + 4], old_k[h * 8: h * 8 + 4])
        assert torch.equal(k[h * 12 + 6: h * 12 + 10], old_k[h * 8 + 4: h * 8 + 8])
        assert k[h * 12 + 4: h * 12 + 6].abs().max().item() == 0.0
        assert k[h * 12 + 10: h * 12 + 12].abs().max().item() == 0.0
    grown = _out(model, fresh)
    with torch.no_grad():
        k[4:6] = 0.3
    assert (_out(model, fresh) - grown).abs().max().item() > 1e-4


def test_what_does_not_grow_head_dim_says_why():
    class OwnRotary(nn.Module):
        """A rotary embedding no rule knows (traced into): its cos/sin carry no group of pairs."""

        def __init__(self, inv_freq: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("inv_freq", inv_freq.clone())

        def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            freqs = position_ids[..., None].to(x.dtype) * self.inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos(), emb.sin()

    llama = _llama(2)
    llama.model.rotary_emb = OwnRotary(llama.model.rotary_emb.inv_freq)
    graph = ff.analyze(llama, _ids(0))
    why = graph["model.layers.0.self_attn.head_dim"].blocked
    assert why is not None and "carry no group of rotated pairs" in why[1]


def test_an_approximate_plan_still_sets_the_attributes():
    model, attn, _, inputs = _build("hf-vit")
    x, fresh = inputs(0), inputs(1)
    before = _out(model, fresh)
    ff.widen(model, x, {f"{attn}.head_dim": 2}, mode="zero", approximate=True)
    m = model.get_submodule(attn)
    assert m.head_dim == 10 and m.scaling == pytest.approx(10 ** -0.5) and check_attrs(model) == []
    assert (_out(model, fresh) - before).abs().max().item() < 1e-10


def test_a_grown_head_dim_saves_and_loads_by_replaying_its_history(tmp_path):
    """The rotary frequencies are non-persistent buffers (not in the state dict): loading replays the growth, whose
    completion recomputes them, so the loaded model is the grown one."""
    def build() -> nn.Module:
        return _llama(2)

    model, x, fresh = build(), _ids(0), _ids(1, 3)
    ff.widen(model, x, {"model.rotary_emb.head_dim": 2}, mode="zero")
    ff.widen(model, x, {"model.layers.0.self_attn.heads": 1}, mode="zero")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # trained a little after growth
    ff.save(model, str(tmp_path / "grown.pt"))
    loaded = ff.load(str(tmp_path / "grown.pt"), build)
    assert (_out(loaded, fresh) - _out(model, fresh)).abs().max().item() == 0.0
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert loaded.model.layers[1].self_attn.head_dim == 12 and check_attrs(loaded) == []


def test_a_layer_name_finds_the_merged_group_and_a_typo_gets_close_names():
    """Analysis merges groups (every Llama layer's head_dim joins the shared rotary pairs); the merged-away names
    still find the group they are part of, and an unknown name in a large graph gets the closest names."""
    from firefly_descent.models import build_model

    model, x = _llama(2), _ids(0)
    graph = ff.analyze(model, x)
    assert graph["model.layers.1.self_attn.head_dim"] is graph["model.rotary_emb.head_dim"]
    ff.widen(model, x, {"model.layers.1.self_attn.head_dim": 1}, mode="zero")
    assert model.model.layers[0].self_attn.head_dim == 10  # one pair: every layer at once
    vgg = ff.analyze(build_model("vgg19", num_classes=10, widths=4), torch.randn(2, 3, 32, 32))
    with pytest.raises(ff.GrowthError, match=r"did you mean 'features\.\d+'.*17 groups"):
        vgg["features.O"]


def test_a_fresh_process_loads_a_grown_hugging_face_model(tmp_path):
    """Loading replays the growth through the engine, which asks the attention's rule (heads, head_dim, scaling):
    the optional rules must be registered by the engine itself, not only by a prior `analyze` (a fresh process that
    only loads has run none)."""
    import subprocess
    import sys

    build = (
        "import torch, transformers\ntransformers.logging.set_verbosity_error()\n"
        "def build():\n    torch.manual_seed(0)\n    return transformers.GPT2LMHeadModel(transformers.GPT2Config("
        "n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=8)).eval()\n"
        "ids = torch.arange(8).view(2, 4)\n"
    )
    save = build + (
        "import firefly_descent as ff\nm = build()\n"
        "ff.widen(m, ids, {'transformer.h.0.attn.head_dim': 2}, mode='zero')\n"
        "ff.widen(m, ids, {'transformer.h.0.attn.heads': 1}, mode='zero')\n"
        "torch.nn.init.normal_(m.transformer.h[0].attn.c_attn.weight, std=0.1)\n"  # trained after growth
        f"ff.save(m, {str(tmp_path / 'g.pt')!r})\ntorch.save(m(ids).logits, {str(tmp_path / 'out.pt')!r})\n"
    )
    load = build + (
        "from firefly_descent.engine import load, check_attrs\n"
        f"m = load({str(tmp_path / 'g.pt')!r}, build)\na = m.transformer.h[0].attn\n"
        f"d = (m(ids).logits - torch.load({str(tmp_path / 'out.pt')!r})).abs().max().item()\n"
        "print(a.head_dim, a.num_heads, check_attrs(m), d)\n"
    )
    subprocess.run([sys.executable, "-c", save], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-c", load], check=True, capture_output=True, text=True).stdout.split()
    assert out[:4] == ["10", "3", "[]", "0.0"], out
