"""``python -m fastkd.bench``: the ``fastkd-bench`` command."""

from fastkd.bench.cli import main

raise SystemExit(main())
