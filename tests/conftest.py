import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PLMRUN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def small_fasta() -> Path:
    """2,000 real Swiss-Prot sequences (<=1,024 residues) from ../shared/data (see its SOURCE.md)."""
    path = SHARED_DATA / "tests_small.fasta"
    if not path.exists():
        pytest.fail(f"{path} is missing: tests need the shared dev data beside the checkout "
                    "(or set PLMRUN_SHARED_DATA to the folder holding tests_small.fasta)")
    return path
