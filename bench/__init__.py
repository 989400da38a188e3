"""Side-by-side benchmarks of edgekit against what a user would write by hand.

Not tests: each script measures, prints a table of ratios with the issue's goals, and writes
``bench/results/<name>.json``. ``python -m bench`` (``make bench``) runs them all.
"""
