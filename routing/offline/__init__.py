"""The offline pipeline: tasks and their scoring, plan search (supervision), router training, evaluation
reports and benchmarks. The server never imports this subpackage."""
