"""The mock upstream of the demo mode, the tests and the benchmarks.

A fast, scriptable OpenAI-compatible server: ``python -m proxy.mock --port 9000``.
"""
