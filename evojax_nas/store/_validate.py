"""Validation of names and JSON read from (or written to) a store.

Everything a store hands back was written by some other process and may be hostile or
truncated: names are matched against strict patterns, JSON is parsed with limits and checked
for finite numbers. Nothing is ever unpickled or evaluated.
"""

import json
import math
import re
from collections.abc import Iterable
from typing import Any

from evojax_nas.errors import CorruptObjectError, StoreError

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
MAX_JSON_BYTES = 1 << 20  # DNA and records are small; anything bigger is hostile or a bug.
MAX_INT = 1 << 63
MAX_DEPTH = 64
SEP = "@"  # Separates the fields of a marker name; never valid inside an ID.


def check_id(ind_id: object, what: str = "individual ID") -> str:
    """Returns `ind_id` if it is a safe name, else raises StoreError.

    Args:
        ind_id: candidate name (individual ID or meta name).
        what: what the name is, for the error message.

    Returns:
        The same string.
    """
    if not isinstance(ind_id, str) or not ID_RE.match(ind_id) or ".." in ind_id:
        raise StoreError(
            f"invalid {what} {ind_id!r}: use 1-80 characters from [A-Za-z0-9_.-], "
            "starting with a letter or digit, without '..'"
        )
    return ind_id


def check_fitness(fitness: object) -> float:
    """Returns `fitness` as a float if it is a finite number in [0, 1], else raises StoreError."""
    if isinstance(fitness, bool) or not isinstance(fitness, int | float):
        raise StoreError(f"fitness must be a number in [0, 1], got {fitness!r}")
    value = float(fitness)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise StoreError(f"fitness must be a finite number in [0, 1], got {fitness!r}")
    return value


def marker_name(ind_id: str, fitness: float, birth: int) -> str:
    """The file/object name that carries an individual's ID, fitness and birth stamp."""
    return f"{ind_id}{SEP}{fitness!r}{SEP}{birth:d}"


def parse_marker(name: str) -> tuple[str, float, int]:
    """Parses a marker name into (id, fitness, birth); raises CorruptObjectError if malformed."""
    parts = name.split(SEP)
    try:
        if len(parts) != 3 or not parts[2].isdigit() or len(parts[2]) > 19:
            raise ValueError("expected '<id>@<fitness>@<birth>'")
        ind_id = check_id(parts[0])
        fitness = check_fitness(float(parts[1]))
        return ind_id, fitness, int(parts[2])
    except (ValueError, StoreError) as e:
        raise CorruptObjectError(f"malformed population marker {name!r}: {e}") from None


def _check_value(value: Any, where: str, depth: int = 0) -> None:
    """Raises ValueError unless `value` is plain JSON with finite, bounded numbers."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} at {where}")
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not -MAX_INT <= value < MAX_INT:
            raise ValueError(f"integer out of range at {where}")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite number at {where}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"non-string key {key!r} at {where}")
            _check_value(item, f"{where}.{key}", depth + 1)
    else:
        raise ValueError(f"{type(value).__name__} is not JSON at {where}")


def dumps(value: dict, what: str) -> bytes:
    """Serialises a dict to JSON bytes; raises StoreError if it is not plain, finite JSON."""
    if not isinstance(value, dict):
        raise StoreError(f"{what} must be a dict, got {type(value).__name__}")
    try:
        _check_value(value, what)
        data = json.dumps(value, allow_nan=False, separators=(",", ":")).encode()
    except (ValueError, TypeError, RecursionError) as e:
        raise StoreError(f"{what} is not JSON-serialisable with finite numbers: {e}") from None
    if len(data) > MAX_JSON_BYTES:
        raise StoreError(f"{what} is {len(data)} bytes; the limit is {MAX_JSON_BYTES}")
    return data


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def loads(data: bytes, what: str) -> dict:
    """Parses JSON bytes read from a store into a dict, with limits.

    Args:
        data: the raw bytes.
        what: the object's name (path or URL), used in the error message.

    Returns:
        The parsed dict.

    Raises:
        CorruptObjectError: the bytes are too big, truncated, not JSON, not a dict, or hold
            non-finite or out-of-range numbers.
    """
    if len(data) > MAX_JSON_BYTES:
        raise CorruptObjectError(f"{what} is {len(data)} bytes; the limit is {MAX_JSON_BYTES}")
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got {type(value).__name__}")
        _check_value(value, "$")
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise CorruptObjectError(f"corrupt object {what}: {e}") from None
    return value


_NUMBER = (int, float)
_NONE = type(None)
RECORD_FIELDS = {  # the types of the record fields that readers rely on
    "parent": (str, _NONE),
    "val_accuracy": _NUMBER,
    "born": _NUMBER,
    "flops": _NUMBER,
    "train_seconds": _NUMBER,
    "learning_rate": _NUMBER,
    "event": (int,),
    "worker": (int,),
    "seed": (int,),
    "params": (int,),
    "steps": (int,),
    "diverged": (bool,),
    "key": (list,),
    "mutation": (dict,),
    "timings": (dict,),
    "architecture": (str,),
    "architecture_key": (str,),
}
HEARTBEAT_FIELDS = {"worker": (int,), "time": _NUMBER, "event": (int,), "target": (str, _NONE)}


def check_fields(value: dict, types: dict, what: str) -> dict:
    """Raises CorruptObjectError naming the first field of `value` whose type is not in `types`.

    bool is not accepted where a number is expected, nor a number where a bool is.
    """
    for name, allowed in types.items():
        if name not in value:
            continue
        v = value[name]
        if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
            names = "/".join("null" if t is _NONE else t.__name__ for t in allowed)
            raise CorruptObjectError(f"corrupt object {what}: {name} must be {names}, got {v!r}")
    return value


def check_record(record: dict, ind_id: str, what: str) -> dict:
    """Checks that a record read back belongs to `ind_id` and its fields have the right types.

    Raises:
        CorruptObjectError: naming what is wrong.
    """
    if record.get("id", ind_id) != ind_id:
        raise CorruptObjectError(f"corrupt object {what}: its id is {record.get('id')!r}")
    check_fields(record, RECORD_FIELDS, what)
    if isinstance(record.get("parent"), str) and not ID_RE.match(record["parent"]):
        raise CorruptObjectError(f"corrupt object {what}: bad parent {record['parent']!r}")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in record.get("key", [])):
        raise CorruptObjectError(f"corrupt object {what}: key must be a list of integers")
    return record


def check_heartbeat(value: dict, what: str) -> dict:
    """Checks a heartbeat's field types; raises CorruptObjectError naming a bad one."""
    check_fields(value, HEARTBEAT_FIELDS, f"heartbeat {what}")
    if "worker" not in value:
        raise CorruptObjectError(f"corrupt object heartbeat {what}: no worker")
    return value


def publication(
    ind_id: object, dna: dict, record: dict, fitness: object
) -> tuple[float, bytes, bytes]:
    """Checks a publish() call's arguments; returns (fitness, DNA bytes, record bytes)."""
    check_id(ind_id)
    fitness = check_fitness(fitness)
    dna_bytes = dumps(dna, "dna")
    record = check_record(dict(record), ind_id, "record") | {"id": ind_id}
    return fitness, dna_bytes, dumps(record, "record")


BLOB_DIR = "programs"  # compiled programs (`evojax_nas.programs`)
RESUME_DIR = "resume"  # in-flight children's training state (`evojax_nas.resume`)
BLOB_DIRS = (BLOB_DIR, RESUME_DIR)  # the only top-level folders blobs may live in


def blob_parts(name: object) -> list[str]:
    """The path segments of a blob name `<dir>/<key>/<file>`; StoreError if unsafe."""
    parts = name.split("/") if isinstance(name, str) else []
    if len(parts) != 3 or parts[0] not in BLOB_DIRS:
        raise StoreError(f"invalid blob name {name!r}: expected {'|'.join(BLOB_DIRS)}/<key>/<file>")
    for part in parts[1:]:
        check_id(part, "blob name segment")
    return parts


def blob_prefix(prefix: object) -> list[str]:
    """The segments of a blob listing prefix, `<dir>` or `<dir>/<key>`; StoreError if unsafe."""
    parts = prefix.split("/") if isinstance(prefix, str) else []
    if not 1 <= len(parts) <= 2 or parts[0] not in BLOB_DIRS:
        raise StoreError(f"invalid blob prefix {prefix!r}: expected <dir> or <dir>/<key>")
    for part in parts[1:]:
        check_id(part, "blob name segment")
    return parts


def blob_names(names: Iterable[str]) -> list[str]:
    """The valid blob names among `names` (a listing may hold foreign objects), sorted."""
    out = []
    for name in names:
        try:
            blob_parts(name)
        except StoreError:
            continue
        out.append(name)
    return sorted(out)
