"""The FX toolkit at the bottom of attnfx: op names, graph editing, in-place writes, provenance
(``graph.py``), what a value depends on and evaluating it now (``static.py``), attention sites and their
records (``sites.py``). It imports nothing from the packages above it."""
