"""``python -m r2r_fx`` runs the ``r2r-rewrite`` command."""

from __future__ import annotations

import sys

from r2r_fx.cli import main

sys.exit(main())
