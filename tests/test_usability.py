"""What a user meets: many models in one process, generate(), what Dynamo did, progress, option errors,
modes, the report reachable from transformers' CompileConfig."""

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hf_models import batch, build
from helpers import repeat_kv

import attnfx
from attnfx.rewriter import backend as backend_module


class GQA(torch.nn.Module):
    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.q, self.kv = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, 2 * kv_heads * self.hd)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        n = self.heads // self.kv_heads
        return F.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n)).transpose(1, 2).reshape(b, s, -1)


def test_many_models_in_one_process_are_each_compiled():
    """Models sharing code (transformers' wrappers) used to exhaust Dynamo's recompile limit after ~8."""
    ids, mask = batch(7)
    for _ in range(10):
        model = build("llama")
        opt = attnfx.optimize(model, compiler="eager")
        with torch.no_grad():
            torch.testing.assert_close(opt(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
        report = attnfx.report(opt)
        assert report.graphs == 1 and report.dynamo == {"compiled": True, "graph_breaks": []}
        assert all(s.rewritten for s in report.sites)


def test_a_model_dynamo_runs_uncompiled_is_reported_and_warned():
    class Skipped(GQA):
        @torch._dynamo.disable
        def forward(self, x):
            return super().forward(x)

    opt = attnfx.optimize(Skipped().eval(), compiler="eager")
    with pytest.warns(UserWarning, match="Dynamo ran the model without compiling it"):
        opt(torch.randn(1, 5, 32))
    report = attnfx.report(opt)
    assert report.dynamo["compiled"] is False and report.dynamo["why"]
    assert "without compiling it" in str(report) and report.to_dict()["dynamo"]["compiled"] is False


def test_a_graph_break_is_reported_with_its_reason():
    class Broken(GQA):
        def forward(self, x):
            y = super().forward(x)
            torch._dynamo.graph_break()
            return y * 2

    model = Broken().eval()
    opt = attnfx.optimize(model, compiler="eager")
    x = torch.randn(1, 5, 32)
    with pytest.warns(UserWarning, match="broke the model into"):
        torch.testing.assert_close(opt(x), model(x))
    report = attnfx.report(opt)
    assert report.dynamo["compiled"] is True and report.dynamo["graph_breaks"]
    assert "graph break" in str(report)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_runs_the_optimized_forward(attn):
    model = build("llama", attn)
    opt = attnfx.optimize(model, compiler="eager")
    ids, mask = batch(7)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        actual = opt.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(actual, expected)
    report = attnfx.report(opt)
    assert report.graphs >= 2 and report.sites and all(s.rewritten for s in report.sites)  # prefill and decode
    assert "forward" not in model.__dict__  # the model itself is left as it was
    with torch.no_grad():
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), expected)


def test_transformers_compile_config_copies_the_backend_and_the_report_stays_reachable():
    backend = attnfx.Backend(compiler="eager")
    assert copy.deepcopy(backend) is backend and copy.copy(backend) is backend
    transformers = pytest.importorskip("transformers")
    config = transformers.CompileConfig(backend=backend, fullgraph=False)
    model = build("llama")
    compiled = torch.compile(model.__call__, **config.to_dict())
    ids, mask = batch(7)
    with torch.no_grad():
        compiled(ids, attention_mask=mask)
    assert backend.report.graphs == 1 and backend.report.sites


def test_options_given_through_torch_compile_raise_options_error():
    model = GQA().eval()
    compiled = torch.compile(model, backend="attnfx", options={"compiler": "eager", "no_such_option": 1})
    with pytest.raises(attnfx.OptionsError, match="no_such_option"):
        compiled(torch.randn(1, 5, 32))


def test_torch_compile_with_a_mode_reaches_the_backend():
    model = GQA().eval()
    x = torch.randn(1, 5, 32)
    compiled = torch.compile(model, backend="attnfx", mode="max-autotune-no-cudagraphs")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("bad, match", [
    (dict(patterns={"gqa": "yes"}), "True/False"),
    (dict(dynamic="maybe"), "dynamic must be"),
    (dict(fullgraph="yes"), "fullgraph must be"),
    (dict(mode="fastest"), "mode must be"),
    (dict(skip_steps="0-2"), "need npu_fp8"),
    (dict(inductor_config={"triton.no_such_setting": True}), "no setting"),
    (dict(progress="loud"), "progress must be"),
])
def test_bad_options_raise_at_optimize_time(bad, match):
    with pytest.raises(attnfx.OptionsError, match=match):
        attnfx.optimize(GQA(), **bad)


def test_long_compiles_say_what_they_are_doing(monkeypatch, capsys):
    monkeypatch.setattr(backend_module, "PROGRESS_AFTER_S", 0.0)
    model, x = GQA().eval(), torch.randn(1, 5, 32)
    with torch.no_grad():
        attnfx.optimize(model, compiler="eager")(x)
    err = capsys.readouterr().err
    assert "attnfx: graph 0: rewriting attention and compiling with eager" in err and "done in" in err
    torch._dynamo.reset()
    with torch.no_grad():
        attnfx.optimize(model, compiler="eager", progress=False)(x)
    assert "attnfx:" not in capsys.readouterr().err


def test_modes_are_accepted_on_any_device():
    model, x = GQA().eval(), torch.randn(1, 5, 32)
    for mode in ("default", "reduce-overhead", "max-autotune-no-cudagraphs"):
        torch._dynamo.reset()
        opt = attnfx.optimize(model, compiler="eager", mode=mode)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning: the model compiled in one graph
            torch.testing.assert_close(opt(x), model(x))
        assert attnfx.report(opt).sites[0].rewritten


def test_torch_logs_knows_attnfx():
    code = "import torch, attnfx, torch._logging._internal as i; print('attnfx' in i.log_registry.log_alias_to_log_qnames)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_masked_select_stays_in_attnfx_graphs_and_only_there():
    def select(x):
        return (x * 2).masked_select(x > 0).sum()

    x = torch.randn(16)
    opt = attnfx.optimize(select, compiler="eager")
    assert opt(x) == select(x)
    assert attnfx.report(opt).graphs == 1 and attnfx.report(opt).dynamo["graph_breaks"] == []
    assert not torch._dynamo.config.capture_dynamic_output_shape_ops  # restored after the call
    torch._dynamo.reset()
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(select, backend=count)(x)
    assert len(graphs) >= 2  # plain torch.compile still breaks the graph at masked_select
