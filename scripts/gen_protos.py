"""Generate the Python gRPC stubs in ``common/v1/`` from ``proto/spillway/v1/*.proto``.

The protos keep the API's own package path (``spillway/v1``, ``package spillway.v1;``); the
stubs live in the floor package ``common`` so that every package can import them without
importing the ``spillway`` command. protoc writes imports that follow the proto path
(``from spillway.v1 import ...``); they are rewritten to ``common.v1`` as the files are copied.

The stubs are committed; ``tests/common/test_protos.py`` regenerates them into a temporary
directory and fails when the committed copies differ. Run this script after editing a proto:

    python scripts/gen_protos.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_DIR = Path("spillway") / "v1"
PACKAGE_DIR = Path("common") / "v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PROTO_DIR).glob("*.proto"))


def _relocate(text: str) -> str:
    """protoc's imports and messages name the proto path; the stubs live in ``common.v1``."""
    return text.replace("from spillway.v1 import", "from common.v1 import").replace(
        "generated code in spillway/v1/", "generated code in common/v1/"
    )


def generate(out_root: Path) -> list[Path]:
    """Write the stubs under ``out_root/common/v1`` and return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir = out_root / PACKAGE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as raw:
        _protoc(protoc, Path(grpc_tools.__file__).parent / "_proto", Path(raw))
        for path in (Path(raw) / PROTO_DIR).iterdir():
            if path.suffix in {".py", ".pyi"}:
                (out_dir / path.name).write_text(_relocate(path.read_text()))
    init = out_dir / "__init__.py"
    init.write_text('"""Generated gRPC stubs for the spillway.v1 API. Do not edit."""\n')
    return sorted(p for p in out_dir.iterdir() if p.suffix in {".py", ".pyi"})


def _protoc(protoc: Any, well_known: Path, out_root: Path) -> None:
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(str(p) for p in proto_files()),
    ]
    # protoc finds the mypy plugins on PATH; they live beside this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repository)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
