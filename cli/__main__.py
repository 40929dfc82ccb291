"""`python -m cli ...` is `drllm ...`."""

from .main import main

raise SystemExit(main())
