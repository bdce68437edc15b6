"""The one exception type for bad .mxq files."""


class MxqFormatError(Exception):
    """A file is not a valid .mxq file (or not one this reader supports).

    The message names the file and the field or tensor at fault, on one line.
    """

    def __init__(self, path, message: str):
        self.path = str(path)
        self.detail = message
        super().__init__(f"{self.path}: {message}")
