"""Factory manifests: the list of devices a provisioning run registers and enrolls."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

from pki.csr import DEVICE_ID_RE
from pki.errors import bad_request

MAX_ROWS = 1_000_000
MAX_ERRORS = 20
_ATTR_MAX = 128


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """ManifestRow is one device of a manifest and the line it came from."""

    line: int
    device_id: str
    model: str | None
    batch: str


def _rows_csv(text: str) -> list[tuple[int, dict[str, str | None]]]:
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in reader.fieldnames or []]
    if not fields:
        raise bad_request("manifest is empty")
    id_field = "device_id" if "device_id" in fields else "id"
    if id_field not in fields:
        raise bad_request("manifest header needs a device_id (or id) column")
    unknown = set(fields) - {"device_id", "id", "model", "batch"}
    if unknown:
        raise bad_request(f"manifest header has unknown columns: {', '.join(sorted(unknown))}")
    rows: list[tuple[int, dict[str, str | None]]] = []
    for record in reader:
        line = reader.line_num
        if None in record:  # more cells than header columns
            rows.append((line, {"_error": "more cells than the header has columns"}))
            continue
        clean = {k.strip(): (v.strip() if isinstance(v, str) else None) for k, v in record.items()}
        rows.append(
            (
                line,
                {
                    "device_id": clean.get(id_field),
                    "model": clean.get("model"),
                    "batch": clean.get("batch"),
                },
            )
        )
    return rows


def _rows_json(text: str) -> list[tuple[int, dict[str, str | None]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise bad_request(f"manifest is not valid JSON: {e}") from None
    if isinstance(data, dict):
        data = data.get("devices")
    if not isinstance(data, list):
        raise bad_request('manifest JSON must be a list of devices or {"devices": [...]}')
    rows: list[tuple[int, dict[str, str | None]]] = []
    for i, item in enumerate(data, start=1):
        if isinstance(item, str):
            item = {"device_id": item}
        if not isinstance(item, dict) or not all(isinstance(v, str | None) for v in item.values()):
            rows.append((i, {"_error": "each device must be an object of strings"}))
            continue
        rows.append(
            (
                i,
                {
                    "device_id": item.get("device_id") or item.get("id"),
                    "model": item.get("model"),
                    "batch": item.get("batch"),
                },
            )
        )
    return rows


def parse_manifest(text: str, *, batch: str, fmt: str = "csv") -> list[ManifestRow]:
    """Parses and checks a whole manifest; every offending line is named, nothing is partial."""
    if not batch or len(batch) > _ATTR_MAX:
        raise bad_request("a provisioning run needs a batch name (1-128 characters)")
    raw = _rows_json(text) if fmt == "json" else _rows_csv(text)
    if len(raw) > MAX_ROWS:
        raise bad_request(f"manifest has more than {MAX_ROWS} devices")
    what = "item" if fmt == "json" else "line"
    errors: list[str] = []
    seen: dict[str, int] = {}
    rows: list[ManifestRow] = []
    for line, fields in raw:
        if "_error" in fields:
            errors.append(f"{what} {line}: {fields['_error']}")
            continue
        device_id = fields.get("device_id") or ""
        model = fields.get("model") or None
        row_batch = fields.get("batch") or batch
        if not DEVICE_ID_RE.match(device_id):
            errors.append(f"{what} {line}: device ID {device_id[:70]!r} is not valid")
            continue
        if device_id in seen:
            errors.append(
                f"{what} {line}: device {device_id} is already on {what} {seen[device_id]}"
            )
            continue
        if row_batch != batch:
            errors.append(
                f"{what} {line}: unknown batch {row_batch[:70]!r} "
                f"(this run provisions batch {batch!r})"
            )
            continue
        if model is not None and len(model) > _ATTR_MAX:
            errors.append(f"{what} {line}: model is longer than {_ATTR_MAX} characters")
            continue
        seen[device_id] = line
        rows.append(ManifestRow(line, device_id, model, row_batch))
    if errors:
        shown = errors[:MAX_ERRORS]
        more = f"; and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise bad_request("manifest rejected, nothing registered: " + "; ".join(shown) + more)
    if not rows:
        raise bad_request("manifest lists no devices")
    return rows
