"""attnfx: torch.compile graph rewrites that make attention fast, exactly.

    opt = attnfx.optimize(model)     # or torch.compile(model, backend="attnfx")
    opt(*inputs)
    print(attnfx.report(opt))
"""

__version__ = "0.1.0"

from attnfx.rewriter.backend import Backend, attnfx_backend  # noqa: E402
from attnfx.rewriter.optimize import optimize, report  # noqa: E402
from attnfx.rewriter.options import Options, OptionsError  # noqa: E402
from attnfx.rewriter.report import Report, SiteRecord  # noqa: E402
from attnfx.rewriter.verify import VerificationError  # noqa: E402
from attnfx.runtime.steps import denoise_step, reset_steps  # noqa: E402

__all__ = [
    "Backend", "Options", "OptionsError", "Report", "SiteRecord", "VerificationError",
    "attnfx_backend", "denoise_step", "optimize", "report", "reset_steps", "__version__",
]
