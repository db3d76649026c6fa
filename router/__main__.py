"""`python -m router` runs the command line."""

from router.cli import main

raise SystemExit(main())
