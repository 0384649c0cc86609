"""data/sp2014.py: the sp2014 split rebuilt from a public source is today's, and a wrong source is refused."""
import hashlib
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))
import prepare  # noqa: E402
import sp2014  # noqa: E402
from dataloader import verified_fingerprint  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
CORPUS = SHARED / "swissprot2014_go.fasta.xz"
from data.tracks import SP2014_FINGERPRINT as FINGERPRINT  # noqa: E402  (what train.py logs for sp2014)
needs_shared = pytest.mark.skipif(not CORPUS.exists(), reason=f"needs {CORPUS} (the corpus only CI and developers have)")


@pytest.fixture(scope="module")
def lists():
    return sp2014.read_split()


@pytest.fixture(scope="module")
def uniprot_fasta(tmp_path_factory) -> Path:
    """The whole corpus (65k accessions more than the split) as UniProt writes it: `>sp|ACC|NAME ...`, wrapped at 60."""
    path = tmp_path_factory.mktemp("uniprot") / "uniprot_sprot.fasta"
    with lzma.open(CORPUS) as corpus, open(path, "wb") as out:
        for header, seq in zip(corpus, corpus):
            acc = header[1:].strip()
            seq = seq.strip()
            lines = b"\n".join(seq[i:i + 60] for i in range(0, len(seq), 60))
            out.write(b">sp|%s|%s_HUMAN Made up OS=Homo sapiens OX=9606 PE=1 SV=1\n%s\n" % (acc, acc, lines))
    return path


@pytest.fixture(scope="module")
def uniprot_seqs(uniprot_fasta, lists) -> dict:
    return sp2014.read_fasta(uniprot_fasta, {acc for split in sp2014.SPLITS for acc, _ in lists[split]}, 0)


def cli(*args):
    return subprocess.run([sys.executable, str(REPO / "data" / "sp2014.py"), *map(str, args)],
                          capture_output=True, text=True)


@needs_shared
def test_corpus_gives_todays_shards(tmp_path):
    out = tmp_path / "sp2014"
    out.mkdir()
    (out / "sp2014_train_000009.bin").write_bytes(b"of an earlier build")  # replaced as a whole
    sp2014.main(["--source", str(CORPUS), "--out", str(out)])
    assert verified_fingerprint(out) == FINGERPRINT
    # each training document's cluster is the published clustering's, numbered as prepare.py --clusters numbers it
    ids = np.concatenate([np.fromfile(f, dtype="<i4") for f in sorted(out.glob("sp2014_train_*.clusters"))])
    train = [acc for acc, _ in sp2014.read_split()["train"]]
    published = prepare.Clusters(SHARED / "sp2014_clusters.tsv.xz").ids(train)
    assert np.array_equal(ids, published)
    assert not (out / "sp2014_train_000009.bin").exists()
    assert not list(tmp_path.glob(".*"))  # no build folder left beside --out


@needs_shared
def test_uniprot_format_gives_the_same_split(uniprot_seqs, lists):
    texts = sp2014.assemble(uniprot_seqs, lists)
    assert texts["valid"] == (SHARED / "sp2014_valid.fasta").read_bytes()
    assert texts["test"] == (SHARED / "sp2014_test.fasta").read_bytes()
    assert hashlib.sha256(texts["train"]).hexdigest() == sp2014.SHA256["train"]  # as SOURCE.md gives it


@needs_shared
def test_missing_or_changed_sequences_are_named(uniprot_seqs, lists):
    (a, _), (b, _), (c, _) = lists["train"][123], lists["valid"][4], lists["test"][9_999]
    seqs = dict(uniprot_seqs)
    del seqs[a], seqs[c]
    with pytest.raises(ValueError, match=f"lacks 2 of sp2014's 370,081 accessions: {a.decode()}, {c.decode()}$"):
        sp2014.assemble(seqs, lists)
    seqs = dict(uniprot_seqs)
    seqs[b] = seqs[b][:-1] + (b"W" if seqs[b][-1:] != b"W" else b"A")
    with pytest.raises(ValueError, match=f"another sequence than sp2014's under 1 accessions: {b.decode()}$"):
        sp2014.assemble(seqs, lists)
    # a change that its 6-bit check misses (1 in 64 do) is caught all the same, by the split's sha256
    seqs = dict(uniprot_seqs)
    k = 1
    while sp2014.check(seqs[a] + b"A" * k) != sp2014.check(seqs[a]):
        k += 1
    seqs[a] += b"A" * k
    with pytest.raises(ValueError, match="in its train split"):
        sp2014.assemble(seqs, lists)


def test_shipped_clusters_number_every_training_record(lists, tmp_path):
    numbers = sp2014.read_clusters()
    assert len(numbers) == len(lists["train"]) and max(numbers) + 1 == 83_821  # sp2014's training clusters
    opened = -1
    for n in numbers:  # numbered as the split first meets them: a record joins a cluster met before or the next one
        assert n <= opened + 1
        opened = max(opened, n)
    damaged = tmp_path / "damaged.txt.xz"
    shipped = lzma.open(REPO / "data" / sp2014.CLUSTERS).read()
    for content, message in [(lzma.compress(shipped.replace(b"\n171\n", b"\n0\n", 1)), "is damaged"),
                             (lzma.compress(shipped)[:1000], "cannot read it"), (b"not xz", "cannot read it")]:
        damaged.write_bytes(content)
        with pytest.raises(ValueError, match=f"damaged.txt.xz.? {message}"):
            sp2014.read_clusters(damaged)


def refusal(argv, capsys) -> str:
    """The one-line message of a refused in-process run."""
    with pytest.raises(SystemExit) as e:
        sp2014.main(argv)
    assert e.value.code != 0
    lines = (e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err).strip().splitlines()
    return lines[-1]


def test_bad_sources_are_refused_in_one_line(tmp_path, lists, capsys):
    """With the shipped sample (users have it too): one line naming the problem, no traceback, nothing at --out."""
    sample = REPO / "data" / "swissprot2014_sample.fasta"
    out = tmp_path / "sp2014"
    r = cli("--source", sample, "--out", out)
    shared = {line[1:] for line in sample.read_bytes().split() if line[:1] == b">"}
    missing = [acc.decode() for split in sp2014.SPLITS for acc, _ in lists[split] if acc not in shared]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1] == (f"sp2014.py: error: {sample}: lacks {len(missing):,} of sp2014's 370,081 accessions: "
                        f"{', '.join(missing[:10])} and {len(missing) - 10:,} more")
    assert not out.exists() and not list(tmp_path.glob(".*"))
    (tmp_path / "notes.txt").write_text("no FASTA here\n")
    (tmp_path / "cut.fasta.xz").write_bytes(lzma.compress(sample.read_bytes())[:50_000])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    for source, o, message in [
            ("nothing.fasta", out, "nothing.fasta: no such file"),
            ("notes.txt", out, "notes.txt: unknown format: neither a .deb nor a FASTA file (plain, .gz or .xz)"),
            ("cut.fasta.xz", out, "cut.fasta.xz: Compressed file ended before the end-of-stream marker was reached"),
            ("notes.txt", tmp_path / "mine", "mine holds other files than sp2014 shards")]:
        assert message in refusal(["--source", str(tmp_path / source), "--out", str(o)], capsys)
    assert not out.exists() and (tmp_path / "mine" / "keep.txt").exists()


@pytest.mark.skipif(os.environ.get("PLMRUN_SLOW_TESTS") != "1", reason="slow: set PLMRUN_SLOW_TESTS=1 (downloads 225 MB)")
def test_deb_gives_todays_shards(tmp_path):
    """No --source: sp2014.py fetches metastudent-data 2.0.1-8 with apt-get download and reads its BLAST databases."""
    r = subprocess.run([sys.executable, str(REPO / "data" / "sp2014.py"), "--out", str(tmp_path / "sp2014")],
                       cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 0, r.stderr
    assert "MFO database read" in r.stderr
    assert verified_fingerprint(tmp_path / "sp2014") == FINGERPRINT
