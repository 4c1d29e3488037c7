"""Errors the engine reports to users.

Every error here carries a one-line message meant to be shown as is; CLIs print it and exit non-zero, the web API
turns it into a JSON 4xx. Anything else escaping the library is a bug.
"""


class EngineError(Exception):
    """Base class: a problem with the user's input, data or environment, explained in one line."""


class ModelLoadError(EngineError):
    """The encoder could not be built (unknown model, missing weights, no network for a download)."""


class ModelMismatchError(EngineError):
    """An index is opened with a different model than the one it was built with."""


class IndexFormatError(EngineError):
    """A directory is not a (readable) index, or its files disagree with each other."""


class IndexExistsError(EngineError):
    """The output directory already holds something and --overwrite was not given."""


class DatasetError(EngineError):
    """An annotation file or image folder cannot be read, or yields nothing usable."""


class DuplicateImageError(DatasetError):
    """An image path the catalog being written already holds."""


class ImageReadError(EngineError):
    """An image cannot be decoded (missing, corrupt, truncated, not an image, too large)."""


class QueryError(EngineError):
    """A query is empty, too long or otherwise unusable."""


class NotFoundError(EngineError):
    """No image (or caption) with the given id in the index (the web API's 404)."""


class NoCaptionsError(EngineError):
    """The index holds no captions (it was built from images alone), so caption search and recall are impossible."""


class WriterBusyError(EngineError):
    """Another live process (or thread) is writing the same index, model folder or demo folder."""
