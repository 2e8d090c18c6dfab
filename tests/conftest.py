import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("AWQ_EDGE_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present")
    return SHARED


@pytest.fixture(scope="session")
def smollm2_fp16() -> Path:
    """The dequantized FP16 reference folder (built once, cached under .cache/)."""
    from awq_edge.reference import ensure_reference_fp16

    return ensure_reference_fp16()
