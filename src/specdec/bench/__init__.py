"""Benchmark harness: tasks from held-out text, methods side by side, reports and plots.

Module map: ``tasks`` (prompts), ``methods`` (plain / HF / drafters behind one call),
``runner`` (timing loop and aggregation), ``report`` (JSON, markdown, plot), ``cost_curve``
(target forward time against the number of scored tokens), ``command`` (``specdec bench``).
"""
