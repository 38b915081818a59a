import sys

from attnfx.rewriter.cli import main

sys.exit(main())
