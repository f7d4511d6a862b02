"""``python -m mentor ...`` (and ``accelerate launch -m mentor ...``) runs the command line."""

from mentor.cli import main

raise SystemExit(main())
