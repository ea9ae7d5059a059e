"""skipserve HTTP layer: OpenAI-compatible routes over the async engine. Imports no torch."""
__version__ = "0.1.0"
