"""``attnfx report MODULE:FACTORY``: optimize a model, run it once, print what attnfx did.

FACTORY is a callable returning ``(model, args)`` or ``(model, args, kwargs)``. MODULE is an
importable module (``examples.llama_gqa``) or a path to a ``.py`` file. Bad input ends with a one-line
message on stderr and a non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import traceback
from typing import Any

import torch

from attnfx.options import OptionsError
from attnfx.rewriter.optimize import optimize, report
from attnfx.rewriter.verify import VerificationError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnfx", description="Attention graph rewrites for torch.compile.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="optimize a model, run it once and print the rewrite report")
    r.add_argument("spec", metavar="MODULE:FACTORY",
                   help="a callable returning (model, args) or (model, args, kwargs)")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument("--device", default="cpu", help="device to run on: cpu or cuda[:N] (default cpu)")
    r.add_argument("--dtype", choices=sorted(DTYPES), help="cast the model and floating inputs to this dtype")
    r.add_argument("--compiler", default="eager", choices=["eager", "aot_eager", "inductor"],
                   help="inner compiler after the rewrite (default eager: the report does not depend on it)")
    r.add_argument("--verify", action="store_true", help="also run the original and check outputs match")
    r.add_argument("--pattern", action="extend", nargs="+", dest="patterns", metavar="NAME",
                   help="enable only these patterns (several names, or the option repeated; default all)")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def load_factory(spec: str):
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"expected MODULE:FACTORY (e.g. examples.llama_gqa:make), got {spec!r}")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            if not os.path.isfile(module_name):
                raise CliError(f"no such file: {module_name}")
            mod_spec = importlib.util.spec_from_file_location(
                os.path.splitext(os.path.basename(module_name))[0], module_name)
            module = importlib.util.module_from_spec(mod_spec)
            sys.path.insert(0, os.path.dirname(os.path.abspath(module_name)))
            sys.modules[mod_spec.name] = module  # dataclasses, pickling and Dynamo look modules up by name
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except CliError:
        raise
    except ModuleNotFoundError as e:
        raise CliError(f"cannot import {module_name!r}: {e}") from e
    except Exception as e:
        raise CliError(f"importing {module_name!r} raised {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        raise CliError(f"module {module_name!r} has no attribute {attr!r}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise CliError(f"{spec} is a {type(factory).__name__}, not a callable")
    return factory


def build(factory, spec: str) -> tuple[Any, tuple, dict]:
    try:
        made = factory()
    except Exception as e:
        raise CliError(f"{spec}() raised {type(e).__name__}: {e}") from e
    if not isinstance(made, (tuple, list)) or len(made) not in (2, 3):
        raise CliError(f"{spec}() must return (model, args) or (model, args, kwargs), got {_kind(made)}")
    model, args, kwargs = (*made, {}) if len(made) == 2 else made
    if not callable(model):
        raise CliError(f"{spec}() returned a model that is not callable ({type(model).__name__})")
    if not isinstance(args, (tuple, list)):
        raise CliError(f"{spec}() must return args as a tuple or list, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise CliError(f"{spec}() must return kwargs as a dict, got {type(kwargs).__name__}")
    return model, tuple(args), kwargs


def _kind(x: Any) -> str:
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}"
    return type(x).__name__


def _move(x: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.to(device)
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_move(v, device, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _move(v, device, dtype) for k, v in x.items()}
    return x


def run_report(ns: argparse.Namespace):
    try:
        device = torch.device(ns.device)
    except RuntimeError as e:
        raise CliError(f"bad --device {ns.device!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: CUDA is not available on this machine")
    if device.type == "meta":
        raise CliError("--device meta: meta tensors hold no values, and the report needs one real call; "
                       "use cpu or cuda")
    dtype = DTYPES.get(ns.dtype) if ns.dtype else None
    _progress(f"building the model from {ns.spec}")
    model, args, kwargs = build(load_factory(ns.spec), ns.spec)
    if isinstance(model, torch.nn.Module):
        model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    args, kwargs = _move(args, device, dtype), _move(kwargs, device, dtype)
    try:
        opt = optimize(model, compiler=ns.compiler, verify=ns.verify, patterns=ns.patterns)
    except OptionsError as e:
        raise CliError(str(e)) from e
    _progress(f"compiling and running once (inner compiler: {ns.compiler})")
    try:
        with torch.no_grad():
            opt(*args, **kwargs)
    except VerificationError as e:
        raise CliError(str(e)) from e
    except Exception as e:
        root = e
        while (root.__cause__ or root.__context__) is not None:  # Dynamo wraps the model's own error
            root = root.__cause__ or root.__context__
        raise CliError(f"running the optimized model raised {type(root).__name__}: {_first_line(root)}") from e
    return report(opt)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""


def _progress(msg: str) -> None:
    print(f"attnfx: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not ns.debug:  # torch logs its own tracebacks when a model fails under Dynamo: one line is ours to print
        torch._logging.set_logs(all=logging.CRITICAL)
    try:
        result = run_report(ns)
    except CliError as e:
        if ns.debug:
            traceback.print_exc()
        print(f"attnfx: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours: still one line unless --debug
        if ns.debug:
            traceback.print_exc()
        print(f"attnfx: internal error: {type(e).__name__}: {_first_line(e)} (run with --debug for details)",
              file=sys.stderr)
        return 1
    print(result.to_json(indent=2) if ns.json else result)
    return 0
