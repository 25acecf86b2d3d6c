"""Benchmark helpers and the mock OpenAI-compatible upstream shared with tests and demo mode."""
