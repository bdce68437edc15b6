class ConversionError(Exception):
    """Bad input to the converter (checkpoint, options, budget): one line naming the problem."""
