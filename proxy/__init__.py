"""An OpenAI-compatible LLM API gateway on aiohttp + uvloop."""

__version__ = "0.1.0"
