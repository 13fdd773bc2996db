"""The store of a TRAK run: a local folder (:mod:`.store`: its errors, safe reads,
checksums, writes, locks, layout, settings record and experiments) or a URL
(:mod:`.objstore`, on tensorstore), behind one interface (:mod:`.backend`)."""

from .backend import StoreBackend, is_url, open_store
from .checksums import file_record, row_checks
from .errors import StoreBusyError, StoreCorruptedError, StoreWriteError
from .layout import FORMAT_VERSION, check_model_id, check_name
from .reading import read_rows
from .store import Store
from .writes import KeptRows, write_rows

__all__ = ["FORMAT_VERSION", "KeptRows", "Store", "StoreBusyError", "StoreCorruptedError",
           "StoreWriteError", "StoreBackend", "check_model_id", "check_name", "file_record",
           "is_url", "open_store", "read_rows", "row_checks", "write_rows"]
