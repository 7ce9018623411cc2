"""File helpers of the engine: re-exported from :mod:`cmtkd.files` (standard library only) and
:mod:`cmtkd.checkpoint` (``model.pt``/``checkpoint.pt``), which own them."""
from __future__ import annotations

from cmtkd.files import (RunLock, atomic_write_bytes, atomic_write_json, atomic_write_text,  # noqa: F401
                         ensure_writable_dir, read_sealed_json, remove_stale_temp_files, sha256_file,
                         write_sealed_json)
