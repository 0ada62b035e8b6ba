"""Factory manifests are checked whole before anything is registered."""

from __future__ import annotations

import pytest

from pki.errors import ErrorKind, PKIError
from pki.manifest import parse_manifest


class TestParseManifest:
    def test_manifest_csv_rows_get_the_run_batch(self) -> None:
        rows = parse_manifest("device_id,model\nDEV-1,m1\nDEV-2,\n", batch="B1")
        assert [(r.line, r.device_id, r.model, r.batch) for r in rows] == [
            (2, "DEV-1", "m1", "B1"),
            (3, "DEV-2", None, "B1"),
        ]

    def test_manifest_json_list_and_object(self) -> None:
        rows = parse_manifest(
            '["A-1", {"id": "A-2", "model": "x", "batch": "B"}]', batch="B", fmt="json"
        )
        assert [r.device_id for r in rows] == ["A-1", "A-2"]
        rows = parse_manifest('{"devices": [{"device_id": "A-3"}]}', batch="B", fmt="json")
        assert rows[0].device_id == "A-3"

    def test_manifest_names_every_offending_line(self) -> None:
        text = (
            "device_id,model,batch\nDEV-1,m,B1\nDEV-1,m,B1\nbad id!,m,B1\n"
            "DEV-3,m,OTHER\nDEV-4,m,B1,extra\n"
        )
        with pytest.raises(PKIError) as e:
            parse_manifest(text, batch="B1")
        msg = e.value.message
        assert e.value.kind is ErrorKind.BAD_REQUEST
        assert "nothing registered" in msg
        assert "line 3: device DEV-1 is already on line 2" in msg
        assert "line 4: device ID 'bad id!' is not valid" in msg
        assert "line 5: unknown batch 'OTHER'" in msg
        assert "line 6: more cells" in msg

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("", "empty"),
            ("serial\nX\n", "device_id"),
            ("device_id,colour\nX,red\n", "unknown columns: colour"),
            ("device_id\n", "no devices"),
        ],
    )
    def test_manifest_bad_header_or_empty(self, text: str, message: str) -> None:
        with pytest.raises(PKIError, match=message):
            parse_manifest(text, batch="B")

    def test_manifest_bad_json(self) -> None:
        with pytest.raises(PKIError, match="not valid JSON"):
            parse_manifest("{", batch="B", fmt="json")
        with pytest.raises(PKIError, match="item 1: each device"):
            parse_manifest("[1]", batch="B", fmt="json")

    def test_manifest_needs_batch(self) -> None:
        with pytest.raises(PKIError, match="batch name"):
            parse_manifest("device_id\nX\n", batch="")
