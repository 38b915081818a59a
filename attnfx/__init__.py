"""attnfx: torch.compile graph rewrites that make attention fast, exactly.

    opt = attnfx.optimize(model)     # or torch.compile(model, backend="attnfx")
    opt(*inputs)
    print(attnfx.report(opt))
"""

from attnfx._version import __version__
from attnfx.fx.sites import SiteRecord
from attnfx.options import Options, OptionsError
from attnfx.rewriter.backend import Backend, attnfx_backend
from attnfx.rewriter.optimize import optimize, report
from attnfx.rewriter.report import Report
from attnfx.rewriter.verify import VerificationError
from attnfx.runtime.cache import clear_caches
from attnfx.runtime.steps import denoise_step, reset_steps

__all__ = [
    "Backend", "Options", "OptionsError", "Report", "SiteRecord", "VerificationError",
    "attnfx_backend", "clear_caches", "denoise_step", "optimize", "report", "reset_steps", "__version__",
]
