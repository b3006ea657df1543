"""A site's answer to `query` (source index, held out, clips), kept on the site's own disk.

Flower starts a fresh ClientApp process for every message; answering node discovery from this
small file spares that process torch, the data and the model (about 1.1 s of CPU per query,
docs/deploy.md). Only a dataset whose split sizes follow from its config and code
(`SourceSet.sizes_from_config`: the synthetic benchmark) is indexed, so the file cannot go
stale; the key is a hash of the data config the server sent, the node config and the source of
`hdf/data`. The module imports neither torch nor `hdf.data`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)
FIELDS = ("source", "heldout", "clips")
MAX_BYTES = 4096  # an index is three numbers; anything larger is not one
_DATA_CODE = Path(__file__).resolve().parent.parent / "hdf" / "data"


def index_dir() -> Path:
    """Where a site keeps its index files: `$HDF_CACHE/sites` (default `.cache/sites`)."""
    return Path(os.environ.get("HDF_CACHE", ".cache")) / "sites"


def _code_digest() -> str | None:
    """Hash of the `hdf/data` source beside this package (None: not found, so no index)."""
    if not _DATA_CODE.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(_DATA_CODE.rglob("*.py")):
        digest.update(path.relative_to(_DATA_CODE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def index_path(cfg_yaml: str, node_config: dict[str, Any]) -> Path | None:
    """The index file of this data config, node and data code (None: the code is not found)."""
    code = _code_digest()
    if code is None:
        return None
    data = (yaml.safe_load(cfg_yaml) or {}).get("data")
    text = json.dumps(
        {"data": data, "node": node_config, "code": code},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return index_dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"


def read(cfg_yaml: str, node_config: dict[str, Any]) -> dict[str, int] | None:
    """The indexed answer, or None (no index yet, or a file that is not one: then rebuilt)."""
    path = index_path(cfg_yaml, node_config)
    if path is None or not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, an index has under {MAX_BYTES}")
        return checked(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        log.warning("site index %s ignored (%s); rebuilding it", path, err)
        return None


def checked(raw: object) -> dict[str, int]:
    """`raw` as a query answer (the three fields, counts >= 0, heldout 0 or 1); ValueError
    naming what is wrong otherwise. Index files and a warm worker's answers are both read so."""
    if not isinstance(raw, dict) or any(k not in raw for k in FIELDS):
        raise ValueError(f"not an answer with the fields {', '.join(FIELDS)}: {str(raw)[:200]}")
    answer = {k: raw[k] for k in FIELDS}
    if not all(type(v) is int and v >= 0 for v in answer.values()) or answer["heldout"] > 1:
        raise ValueError(f"bad values {answer}")
    return answer


def write(cfg_yaml: str, node_config: dict[str, Any], answer: dict[str, int]) -> None:
    """Keep `answer` for the next query (atomically; a failure only costs the next query time)."""
    path = index_path(cfg_yaml, node_config)
    if path is None:
        return
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({k: int(answer[k]) for k in FIELDS}, f)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        log.warning("site index %s not written (%s): every query will load torch", path, err)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
