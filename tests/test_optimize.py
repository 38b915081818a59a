"""attnfx.optimize / attnfx.report / backend="attnfx": behaviour a user relies on."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same

import attnfx
from attnfx.patterns.base import Outcome, Pattern


class GQA(torch.nn.Module):
    def __init__(self, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.hd)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.hd).unbind(2)
        n = self.heads // self.kv_heads
        k = k.transpose(1, 2).repeat_interleave(n, dim=1)
        v = v.transpose(1, 2).repeat_interleave(n, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


def test_optimized_module_behaves_like_the_original():
    model = GQA().eval()
    opt = attnfx.optimize(model, compiler="eager")
    x = torch.randn(2, 5, 64)
    assert_same(opt(x), model(x))
    assert_same(opt(x, mask=None), model(x))
    assert [p is q for p, q in zip(opt.parameters(), model.parameters())] == [True] * 6
    opt.train()
    assert model.training
    opt.eval()
    assert not model.training
    opt.to(torch.float64)
    assert model.q.weight.dtype == torch.float64
    assert_same(opt(x.double()), model(x.double()))
    assert all(s.rewritten for s in attnfx.report(opt).sites)


def test_report_contents_and_json():
    model = GQA().eval()
    opt = attnfx.optimize(model, compiler="eager")
    assert "no attention sites" in str(attnfx.report(opt))
    opt(torch.randn(1, 4, 64))
    rep = attnfx.report(opt)
    data = json.loads(json.dumps(rep.to_dict()))
    (site,) = data["sites"]
    assert site["module"] == "<root>" and site["source"].startswith("tests/test_optimize.py:")
    assert site["patterns"] == ["gqa"] and site["applied"] == ["gqa"] and site["rewritten"] is True
    assert site["target"] == "F.scaled_dot_product_attention(enable_gqa=True)"
    assert site["savings"] == {"kv_expansion_bytes": 2 * 4 * 4 * 16 * 4}
    assert data["summary"] == {"sites": 1, "rewritten": 1, "graphs": 1, "savings": site["savings"],
                               "cached_groups": 0, "cached_bytes": 0}
    text = str(rep)
    assert "module" in text and "gqa" in text and "1/1 attention sites rewritten" in text


@pytest.mark.parametrize("kwargs,message", [
    ({"bogus": 1}, "unknown attnfx option(s) bogus"),
    ({"patterns": ["nope"]}, "unknown pattern(s) 'nope'; available: manual_attention, gqa"),
    ({"patterns": {"gqa": False, "x": True}}, "unknown pattern(s) 'x'"),
    ({"compiler": "tvm"}, "compiler must be one of"),
    ({"verify": "yes"}, "verify must be True or False"),
    ({"rtol": -1}, "rtol must be a non-negative number"),
])
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(attnfx.OptionsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        attnfx.optimize(GQA(), **kwargs)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module or a callable"):
        attnfx.optimize(42)
    with pytest.raises(TypeError, match="attnfx.optimize"):
        attnfx.report(GQA())


def test_two_optimizations_of_one_model_keep_their_own_reports():
    model = GQA().eval()
    a = attnfx.optimize(model, compiler="eager")
    b = attnfx.optimize(model, compiler="eager", patterns=[])
    x = torch.randn(1, 4, 64)
    a(x)
    b(x)
    assert attnfx.report(a).sites[0].rewritten and not attnfx.report(b).sites[0].rewritten
    assert attnfx.report(a) is not attnfx.report(b)


def test_patterns_can_be_switched_off():
    model = GQA().eval()
    opt = attnfx.optimize(model, compiler="eager", patterns={"gqa": False})
    x = torch.randn(1, 4, 64)
    assert_same(opt(x), model(x))
    (site,) = attnfx.report(opt).sites
    assert not site.rewritten and site.patterns == []


def _broken_pattern():
    """A pattern that rewrites wrongly (doubles the scale): verify must catch it and name the site."""

    def rewrite(site, ctx):
        site.node.kwargs = {**site.node.kwargs, "scale": 2.0}
        return Outcome(target="broken")

    return Pattern("broken", rewrite, applies_to="sdpa")


def test_verify_names_the_site_that_differs(monkeypatch):
    broken = _broken_pattern()
    monkeypatch.setattr("attnfx.rewriter.backend.NAMES", ("broken",))
    monkeypatch.setattr("attnfx.rewriter.passes.ORDER", (broken,))
    opt = attnfx.optimize(GQA().eval(), compiler="eager", verify=True)
    with pytest.raises(attnfx.VerificationError, match=r"attention site <root> \(tests/test_optimize.py:\d+\) "
                                                       r"rewritten by broken"):
        opt(torch.randn(1, 4, 64))


def test_verify_catches_a_wrong_rewrite_downstream_of_the_site(monkeypatch):
    """A rewrite that leaves the attention right but breaks what follows it (as dead_tokens' narrowing of
    o_proj could): the site compares equal, the graph's output does not."""

    def rewrite(site, ctx):
        for user in list(site.node.users):
            with site.node.graph.inserting_after(user):
                doubled = site.node.graph.call_function(torch.mul, (user, 2.0))
            doubled.meta = dict(user.meta)
            user.replace_all_uses_with(doubled, delete_user_cb=lambda n: n is not doubled)
        return Outcome(target="sdpa, then twice what follows")

    monkeypatch.setattr("attnfx.rewriter.backend.NAMES", ("downstream",))
    monkeypatch.setattr("attnfx.rewriter.passes.ORDER", (Pattern("downstream", rewrite, applies_to="sdpa"),))
    opt = attnfx.optimize(GQA().eval(), compiler="eager", verify=True)
    with pytest.raises(attnfx.VerificationError, match=r"graph output 0 differs from the original"):
        opt(torch.randn(1, 4, 64))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_verify_passes_on_generate_prefill_with_logits_to_keep(arch):
    """generate()'s prefill: eager attention, logits_to_keep=1 (only the last row is read: dead_tokens)."""
    from hf_models import batch, build

    model = build(arch, "eager")
    opt = attnfx.optimize(model, compiler="eager", verify=True)
    ids, mask = batch(9)
    with torch.no_grad():
        actual = opt(ids, attention_mask=mask, logits_to_keep=1).logits
        expected = model(ids, attention_mask=mask, logits_to_keep=1).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    report = attnfx.report(opt)
    assert report.verified is True
    assert any("dead_tokens" in s.applied for s in report.sites)


def test_an_internal_error_compiles_the_graph_unchanged(monkeypatch):
    def rewrite(site, ctx):
        raise KeyError("bug")

    monkeypatch.setattr("attnfx.rewriter.backend.NAMES", ("buggy",))
    monkeypatch.setattr("attnfx.rewriter.passes.ORDER", (Pattern("buggy", rewrite, applies_to="sdpa"),))
    model = GQA().eval()
    opt = attnfx.optimize(model, compiler="eager", strict=False)
    x = torch.randn(1, 4, 64)
    assert_same(opt(x), model(x))
    (site,) = attnfx.report(opt).sites
    assert not site.rewritten and "internal error (KeyError" in site.reason
    with pytest.raises(Exception, match="bug"):
        torch._dynamo.reset()
        attnfx.optimize(model, compiler="eager", strict=True)(x)


def test_verify_with_an_inplace_buffer_update_applies_it_once():
    class Cached(GQA):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return super().forward(x)

    model = Cached().eval()
    opt = attnfx.optimize(model, compiler="eager", verify=True)
    opt(torch.randn(1, 4, 64))
    assert model.calls.item() == 1
    assert attnfx.report(opt).verified


def test_string_backend_from_a_fresh_process_via_entry_point():
    code = textwrap.dedent("""
        import json, sys, torch
        import torch.nn.functional as F
        def attn(q, k, v):
            return F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
        assert "attnfx" not in sys.modules
        c = torch.compile(attn, backend="attnfx", options={"compiler": "eager"})
        q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
        torch.testing.assert_close(c(q, k, k + 1), attn(q, k, k + 1))
        import attnfx
        print(json.dumps(attnfx.report().to_dict()))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(__file__))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout.strip().splitlines()[-1])
    assert data["summary"]["rewritten"] == 1 and data["sites"][0]["patterns"] == ["gqa"]


@pytest.mark.inductor
def test_inductor_end_to_end_hf_llama():
    from hf_models import batch, build

    model = build("llama", "eager")
    opt = attnfx.optimize(model, verify=True)  # default inner compiler: Inductor
    ids, mask = batch(8)
    with torch.no_grad():
        torch.testing.assert_close(opt(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   rtol=1e-4, atol=1e-4)
    rep = attnfx.report(opt)
    assert rep.verified and all(s.applied[:2] == ["manual_attention", "gqa"] for s in rep.sites)


@pytest.mark.inductor
def test_inductor_dynamic_shapes_and_gradients():
    model = GQA()
    opt = attnfx.optimize(model, dynamic=True)
    for length in (5, 9):
        x = torch.randn(2, length, 64, requires_grad=True)
        expected = torch.autograd.grad(model(x).sum(), (x, model.kv.weight))
        actual = torch.autograd.grad(opt(x).sum(), (x, model.kv.weight))
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    rep = attnfx.report(opt)
    assert rep.graphs == 1 and rep.sites[0].rewritten


class _Attn(torch.nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.qkv, self.heads = torch.nn.Linear(dim, 3 * dim), heads

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)


class _BreakingAttn(_Attn):
    def forward(self, x):
        torch._dynamo.graph_break()  # the attention is compiled in a frame of its own
        return super().forward(x)


class _Block(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(s, x):  # noqa: N805  (not called self: names must not depend on it)
        return x + s.attn(x)


class _Net(torch.nn.Module):
    def __init__(self, attn=_Attn):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(attn()), _Block(attn())])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("attn", [_Attn, _BreakingAttn])
def test_a_site_is_named_as_named_modules_names_it(attn):
    """Whatever the frame Dynamo compiles: the model's forward, a block's ``forward(s, x)``, an attention
    compiled apart after a graph break (one frame then serves every layer of that class: the first names it),
    or a wrapper taking the model among ``*args``."""
    model = _Net(attn).eval()
    x = torch.randn(1, 5, 32)
    layers = ["blocks.0.attn", "blocks.1.attn"] if attn is _Attn else ["blocks.0.attn"]
    opt = attnfx.optimize(model, compiler="eager")
    with torch.no_grad():
        opt(x)
    assert [s.module for s in attnfx.report(opt).sites] == layers
    torch._dynamo.reset()
    opt = attnfx.optimize(_Block(attn()).eval(), compiler="eager")
    with torch.no_grad():
        opt(x)
    assert [s.module for s in attnfx.report(opt).sites] == ["attn"]
    torch._dynamo.reset()

    def wrapped(*args):
        return args[0](args[1])

    backend = attnfx.Backend(compiler="eager")  # no model known: names relative to the frame's module
    with torch.no_grad():
        torch.compile(wrapped, backend=backend)(model, x)
    assert [s.module for s in backend.report.sites] == (layers if attn is _Attn else ["<root>"])
