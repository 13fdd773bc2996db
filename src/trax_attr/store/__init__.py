"""The on-disk store of a TRAK run (see :mod:`.store`): its errors, safe reads, checksums,
writes, locks, layout, settings record and experiments."""

from .checksums import file_record, row_checks
from .errors import StoreBusyError, StoreCorruptedError, StoreWriteError
from .layout import FORMAT_VERSION, check_model_id, check_name
from .reading import read_rows
from .store import Store
from .writes import KeptRows, write_rows

__all__ = ["FORMAT_VERSION", "KeptRows", "Store", "StoreBusyError", "StoreCorruptedError",
           "StoreWriteError", "check_model_id", "check_name", "file_record", "read_rows",
           "row_checks", "write_rows"]
