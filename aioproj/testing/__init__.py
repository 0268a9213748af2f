"""Emulators users can run in their own tests: real HTTP servers on 127.0.0.1.

Import each from its module (``aioproj.testing.databricks``, ``aioproj.testing.kubernetes``);
importing this package loads neither.
"""
