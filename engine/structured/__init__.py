"""Structured outputs: answers held to a JSON schema (OpenAI's `response_format`) by masking, at
each step, the tokens that could not continue a document the schema allows. The package imports
nothing itself: the server reads the schema compiler (`schema`) without torch, which `constraint`
needs."""
