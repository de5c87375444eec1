"""``python -m codegen_ls``: same as the ``codegen-ls`` console script."""

from __future__ import annotations

from codegen_ls.cli import main

raise SystemExit(main())
