"""The `drllm` command line: one argparse tree for the model-side commands (generate, bench), the offline
pipeline (search, train, eval, calibrate) and `serve`. Commands import their heavy modules when they run."""
