"""Regenerate the committed protobuf/gRPC stubs from ``symbiosis.proto`` (grpcio-tools).

Run ``python -m symbiosis.transport.protogen`` after editing the proto. The stubs are committed so
that a running client or server needs only the protobuf runtime, not a compiler; a test checks
that they match a fresh generation.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
PROTO = "symbiosis.proto"
STUBS = ("symbiosis_pb2.py", "symbiosis_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile the proto into ``out_dir``; return the stub paths (imports made package-relative)."""
    from grpc_tools import protoc

    code = protoc.main(["grpc_tools.protoc", f"-I{HERE}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", str(HERE / PROTO)])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    grpc_stub = out_dir / STUBS[1]
    grpc_stub.write_text(re.sub(r"^import symbiosis_pb2 as", "from . import symbiosis_pb2 as", grpc_stub.read_text(), flags=re.M))
    return [out_dir / name for name in STUBS]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            (HERE / path.name).write_text(path.read_text())
            print(f"wrote {HERE / path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
