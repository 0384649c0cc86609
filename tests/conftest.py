import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # triton_kernels.py then runs in Triton's CPU interpreter (read when it is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SAMPLE_FASTA = REPO / "data" / "swissprot2014_sample.fasta"


@pytest.fixture(scope="session")
def small_fasta() -> Path:
    """2,000 real Swiss-Prot sequences (<=1,024 residues) shipped in the repository (data/README.md says whence)."""
    return SAMPLE_FASTA


@pytest.fixture(scope="session")
def small_shards(small_fasta, tmp_path_factory) -> Path:
    """Shards of the sample made by our own prepare script: 1,950 train, 25 valid, 25 test sequences (few: the
    CPU evaluates densely)."""
    import subprocess
    import sys
    out = tmp_path_factory.mktemp("small_shards")
    subprocess.run([sys.executable, str(REPO / "data" / "prepare.py"), "--fasta", str(small_fasta), "--out", str(out),
                    "--name", "small", "--num_valid", "25", "--num_test", "25", "--seed", "0"],
                   check=True, capture_output=True, text=True)
    return out
