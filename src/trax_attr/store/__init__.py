"""The on-disk store of a TRAK run: files, locks, layout (see :mod:`.store`)."""

from .files import StoreBusyError, StoreWriteError, file_record, read_rows, write_rows
from .layout import FORMAT_VERSION, check_model_id, check_name
from .store import Store

__all__ = ["FORMAT_VERSION", "Store", "StoreBusyError", "StoreWriteError", "check_model_id",
           "check_name", "file_record", "read_rows", "write_rows"]
