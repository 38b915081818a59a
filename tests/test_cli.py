"""The attnfx report CLI, end to end in a subprocess: good specs print the report; bad input gives a
one-line message on stderr, a non-zero exit and no traceback."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(*args):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "attnfx", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def test_report_table():
    r = run("report", "hf_models:llama_factory")
    assert r.returncode == 0, r.stderr
    assert "model.layers.0.self_attn" in r.stdout and "model.layers.1.self_attn" in r.stdout
    assert "2/2 attention sites rewritten" in r.stdout
    assert "Traceback" not in r.stderr


def test_report_json_from_a_file_path():
    r = run("report", os.path.join(HERE, "hf_models.py") + ":llama_factory", "--json", "--verify")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["summary"]["sites"] == 2 and data["summary"]["rewritten"] == 2
    assert data["verified"] is True
    site = data["sites"][0]
    for key in ("module", "source", "patterns", "rewritten", "target", "reason", "savings"):
        assert key in site
    assert site["applied"] == ["gqa", "mask_structure"] and site["savings"]["kv_expansion_bytes"] > 0
    assert site["mask"]["analysis"] == "specialized" and site["mask"]["kind"] == "padding"
    assert site["specialized_on"][0]["checked"] == 1 and site["specialized_on"][0]["failed"] == 0


def test_report_on_an_example_file_with_dataclasses():
    """A file path spec is imported as a registered module (dataclasses look their module up by name)."""
    r = run("report", "examples/hunyuan_image3.py:make_step1_image_rows", "--json")
    assert r.returncode == 0, r.stderr
    (site,) = json.loads(r.stdout)["sites"]
    assert site["dead_tokens"]["queries"] == 22 and site["savings"]["projection_flops"] > 0
    assert site["mask"]["keys_never_attended"] == 1  # the mask is an input here: the EOI key is skipped at run time


def test_report_with_dtype_and_pattern_selection():
    r = run("report", "hf_models:llama_factory", "--json", "--dtype", "bfloat16", "--pattern", "manual_attention")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["summary"]["rewritten"] == 0  # gqa switched off, and the sdpa model has no manual attention


def test_several_patterns_after_one_option():
    r = run("report", "hf_models:llama_factory", "--json", "--pattern", "gqa", "dead_tokens")
    assert r.returncode == 0, r.stderr
    site = json.loads(r.stdout)["sites"][0]
    assert site["applied"] == ["gqa"] and "mask_structure" not in site["patterns"]


BAD = [
    (["report", "no_colon_here"], "expected MODULE:FACTORY"),
    (["report", "no_such_module_xyz:make"], "cannot import 'no_such_module_xyz'"),
    (["report", "hf_models:no_such_factory"], "has no attribute 'no_such_factory'"),
    (["report", "hf_models:COMMON"], "not a callable"),
    (["report", "bad_factories:raises"], "raised RuntimeError: factory failed"),
    (["report", "bad_factories:wrong_shape"], "must return (model, args) or (model, args, kwargs)"),
    (["report", "bad_factories:args_not_tuple"], "args as a tuple or list"),
    (["report", "bad_factories:model_fails"], "running the optimized model raised"),
    (["report", "missing/file.py:make"], "no such file"),
    (["report", "hf_models:llama_factory", "--device", "cuda:0"], "CUDA is not available"),
    (["report", "hf_models:llama_factory", "--device", "banana"], "bad --device"),
    (["report", "hf_models:llama_factory", "--pattern", "nope"], "unknown pattern"),
    (["report", "hf_models:llama_factory", "--pattern", "gqa", "nope"], "unknown pattern"),
    (["report", "hf_models:llama_factory", "--device", "meta"], "--device meta"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_without_traceback(args, message):
    if any(a.startswith("cuda") for a in args) and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = run(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3, r.stderr  # progress lines and the error, nothing else


def test_debug_shows_the_traceback():
    r = run("report", "bad_factories:raises", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_usage_error_exits_2():
    r = run("report")
    assert r.returncode == 2 and "MODULE:FACTORY" in r.stderr
