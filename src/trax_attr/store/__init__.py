"""The on-disk store of a TRAK run: files, locks, layout (see :mod:`.store`)."""

from .files import (StoreBusyError, StoreCorruptedError, StoreWriteError, file_record, read_rows,
                    row_checks, write_rows)
from .layout import FORMAT_VERSION, check_model_id, check_name
from .store import Store

__all__ = ["FORMAT_VERSION", "Store", "StoreBusyError", "StoreCorruptedError", "StoreWriteError",
           "check_model_id", "check_name", "file_record", "read_rows", "row_checks", "write_rows"]
