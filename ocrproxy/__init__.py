"""ocrproxy: an OpenAI-compatible reverse proxy that gives every model image recognition."""

__version__ = "0.1.0"
