class ModelError(Exception):
    """A file or request the runtime cannot serve (bad model config, prompt too long, no GPU ...)."""
