"""Deliberately naive references the tests compare xmodal against.

* :mod:`reference.naive` -- cross-modal attention written from the equations in float64, one
  batch element and one head at a time, with explicit masking.
* the seed notebook's class, verbatim: :mod:`xmodal.bench.notebook` (the benchmark baseline).
"""
