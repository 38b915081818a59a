"""The rewriter: pass manager, compile backend, optimize(), verification and the report."""
