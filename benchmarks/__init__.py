"""Benchmarks (scripts, not tests): quality on standard test sets against classical CPU methods, speed
against this machine's matrix-multiply rate, storage, and the cost of adding a degradation.

``python -m benchmarks`` after ``dvc repro``; it writes ``reports/benchmarks.json`` and
``reports/benchmarks.md``, and ``--readme`` puts the markdown into README's Performance section.
"""
