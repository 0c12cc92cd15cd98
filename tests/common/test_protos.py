"""The committed gRPC stubs are exactly what scripts/gen_protos.py generates from the protos."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = gen
    spec.loader.exec_module(gen)
    generated = gen.generate(tmp_path)
    assert generated, "the generator wrote nothing"
    committed_dir = ROOT / "common" / "v1"
    stale = []
    for path in generated:
        relative = path.relative_to(tmp_path)
        committed = ROOT / relative
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(relative))
    extra = {p.name for p in committed_dir.iterdir() if p.suffix in {".py", ".pyi"}} - {
        p.name for p in generated
    }
    assert not stale, f"stale stubs (run `make protos`): {stale}"
    assert not extra, f"stubs without a proto: {sorted(extra)}"


def test_every_proto_declares_the_package() -> None:
    for proto in (ROOT / "proto" / "spillway" / "v1").glob("*.proto"):
        assert "package spillway.v1;" in proto.read_text(), proto
