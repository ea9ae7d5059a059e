"""Structured outputs: answers held to a JSON schema (OpenAI's `response_format`) by masking, at
each step, the tokens that could not continue a document the schema allows."""
from engine.structured.constraint import Constraint, StructuredOutputs

__all__ = ["Constraint", "StructuredOutputs"]
