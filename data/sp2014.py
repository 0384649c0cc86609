"""Build the sp2014 shards (train / valid / test of UniProtKB/Swiss-Prot 2014_01) from a public source.

    python data/sp2014.py --out data/sp2014                                   # fetches metastudent-data with apt-get
    python data/sp2014.py --source metastudent-data_2.0.1-8_all.deb --out data/sp2014
    python data/sp2014.py --source uniprot_sprot.fasta.gz --out data/sp2014   # Swiss-Prot release 2014_01
    python data/sp2014.py --source swissprot2014_go.fasta.xz --out data/sp2014

A source is the Debian package metastudent-data 2.0.1-8 (`apt-get download metastudent-data=2.0.1-8`, 225 MB; its
three BLAST databases of GO-annotated Swiss-Prot 2014_01 entries are read here, no BLAST tools needed) or a FASTA
file (plain, .gz or .xz) whose headers start with the accession (`>P69905 ...`) or are UniProt's (`>sp|P69905|...`).
The split ships as data/sp2014_split_{train,valid,test}.txt.xz: one line per record in the split's order, the
accession and then one check character. The records are looked up by accession, checked, written as the three
FASTA files the split was published as, and tokenized by prepare.py. Each training shard gets its cluster file
(for train.py --sample_by_cluster) from data/sp2014_split_train_clusters.txt.xz, the cluster of each training record.
Shards and cluster files equal those of `prepare.py --train sp2014_train.fasta.xz --valid sp2014_valid.fasta
--test sp2014_test.fasta --clusters sp2014_clusters.tsv.xz --name sp2014` (the published split and clustering).
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import base64
import gzip
import hashlib
import io
import lzma
import shutil
import subprocess
import tarfile
import tempfile
import time

import numpy as np

import prepare
from dataloader import write_manifest

HERE = Path(__file__).resolve().parent
SPLITS = ("train", "valid", "test")
# Whole-split check: sha256 of each assembled FASTA file, the published sp2014_{train,valid,test}.fasta (train
# uncompressed). Every line of a list also carries the first base64 character (6 bits) of its sequence's sha256:
# 370,081 of them fit the 1.5 MB budget beside the accessions (1.39 MB in all) and name 63 in 64 changed records;
# the whole-split sha256 catches any change for certain, the rare ones the short checks miss included.
SHA256 = {"train": "6a9d83dc326a3060add29fb614ed9ebb5a2141e36b629e59b05d071b4ff834e4",
          "valid": "2c78a9da5679c3ea9aa22c2f351305a9ee3db31c3db90c797bc3c07c7fe80878",
          "test": "1a20b5654f3cdda26c8d050770d98c6aacaaa26f8b5147ad87daf8ef86dc0d5e"}
CLUSTERS = "sp2014_split_train_clusters.txt.xz"  # each training record's 50%-identity cluster (data/README.md)
CLUSTERS_SHA256 = "643d1e5cc8e3c317a43e684218dccda8ef15146497f0a4170cfff3bf4c224d7b"  # of the list uncompressed
PACKAGE = "metastudent-data=2.0.1-8"
DATABASES = [f"./usr/share/metastudent-data/dataset_201401/{aspect}/goasp.fasta" for aspect in ("BPO", "MFO", "CCO")]
NCBISTDAA = b"-ABCDEFGHIKLMNPQRSTVWXYZU*OJ"  # BLAST's protein code: byte value -> residue letter
TO_LETTERS = bytes.maketrans(bytes(range(len(NCBISTDAA))), NCBISTDAA)
TITLE = b"0\x800\x80\xa0\x80\x1a"  # BER of a def-line set up to its first title's length, as makeblastdb writes it


def check(seq: bytes) -> bytes:
    return base64.b64encode(hashlib.sha256(seq).digest())[:1]


def read_split() -> dict:
    """split -> [(accession, check character)] in the split's order."""
    lists = {}
    for split in SPLITS:
        lines = lzma.open(HERE / f"sp2014_split_{split}.txt.xz").read().split()
        lists[split] = [(line[:-1], line[-1:]) for line in lines]
    return lists


def read_clusters(path: Path = HERE / CLUSTERS) -> list:
    """The cluster number of each training record, in the split's order: clusters numbered 0, 1, ... in the order
    the split first meets them (as prepare.py numbers them), from the shipped list."""
    try:
        text = lzma.open(path).read()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None
    if hashlib.sha256(text).hexdigest() != CLUSTERS_SHA256:  # the cluster files are not in the data fingerprint
        raise ValueError(f"{path} is damaged (its sha256 is not the shipped list's); restore it with git checkout")
    return [int(n) for n in text.split()]


def say(message: str, start: float):
    print(f"sp2014.py: {message} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)


def read_blast_db(pin: bytes, phr: bytes, psq: bytes, wanted: set, seqs: dict):
    """Add the wanted accessions' sequences of one BLAST v4 protein database (.pin index, .phr headers, .psq
    residues) to seqs. The .pin: version, type, title, date, count, residue total, longest, then the big-endian
    offsets of every header and every sequence; a sequence ends with a 0 byte; a title starts 'ACCESSION|'."""
    version, kind, title_len = np.frombuffer(pin, ">i4", 3)
    if (version, kind) != (4, 1):
        raise ValueError(f"a BLAST database of version {version}, type {kind}: expected version 4, protein (1)")
    pos = 12 + title_len
    pos += 4 + int(np.frombuffer(pin, ">i4", 1, pos)[0])  # the date
    count = int(np.frombuffer(pin, ">i4", 1, pos)[0])
    pos += 16  # count, residue total (8 bytes), longest
    heads = np.frombuffer(pin, ">i4", count + 1, pos).tolist()
    starts = np.frombuffer(pin, ">i4", count + 1, pos + 4 * (count + 1)).tolist()
    for i in range(count):
        head = phr[heads[i]:heads[i + 1]]
        if not head.startswith(TITLE):
            raise ValueError(f"header {i} is not a def-line set starting with its title: {head[:20]!r}")
        n, at = head[len(TITLE)], len(TITLE) + 1
        if n & 0x80:  # BER's long form: the low bits count the big-endian length bytes that follow
            n, at = int.from_bytes(head[at:at + (n & 0x7f)], "big"), at + (n & 0x7f)
        acc = head[at:at + n].split(b"|", 1)[0]
        if acc in wanted and acc not in seqs:
            seqs[acc] = psq[starts[i]:starts[i + 1] - 1].translate(TO_LETTERS)


def read_deb(path: Path, wanted: set, start: float) -> dict:
    """The wanted sequences of metastudent-data's .deb: an ar archive whose data.tar.xz holds the databases."""
    with open(path, "rb") as f:
        f.seek(8)  # past the ar magic
        while True:  # ar members: a 60-byte header (name 16 bytes, ..., size 10 at 48, magic 2), data padded to even
            header = f.read(60)
            if len(header) < 60:
                raise ValueError("a .deb without data.tar.xz")
            name, size = header[:16].strip().rstrip(b"/"), int(header[48:58])
            if name == b"data.tar.xz":
                data = f.read(size)
                break
            f.seek(size + size % 2, 1)
    seqs, parts = {}, {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|xz") as tar:  # streamed: one database in memory at a time
        for member in tar:
            prefix, _, suffix = member.name.rpartition(".")
            if prefix in DATABASES and suffix in ("pin", "phr", "psq"):
                parts[suffix] = tar.extractfile(member).read()
                if len(parts) == 3:
                    read_blast_db(parts.pop("pin"), parts.pop("phr"), parts.pop("psq"), wanted, seqs)
                    say(f"{prefix.split('/')[-2]} database read: {len(seqs):,} of {len(wanted):,} accessions found",
                        start)
    return seqs


def read_fasta(path: Path, wanted: set, start: float) -> dict:
    """The wanted sequences of a FASTA file (plain, .gz or .xz); the accession is the header's first word, or its
    second field in UniProt's `>sp|ACCESSION|NAME ...`."""
    with open(path, "rb") as f:
        magic = f.read(6)
    opener = gzip.open if magic[:2] == b"\x1f\x8b" else lzma.open if magic == b"\xfd7zXZ\x00" else lambda raw: raw
    seqs, last, rest = {}, time.time(), b""
    with open(path, "rb") as raw, opener(raw) as f:
        chunk = f.read(8 << 20)
        if not chunk.lstrip().startswith(b">"):
            raise ValueError("unknown format: neither a .deb nor a FASTA file (plain, .gz or .xz)")
        rest = chunk.lstrip()[1:]
        while chunk:
            chunk = f.read(8 << 20)
            records = (rest + chunk).split(b"\n>")
            rest = records.pop() if chunk else b""  # the last record may go on in the next chunk
            for record in records:
                header, _, seq = record.partition(b"\n")
                word = (header.split() or [b""])[0]
                acc = word.split(b"|")[1] if word[:3] in (b"sp|", b"tr|") else word
                if acc in wanted and acc not in seqs:
                    seqs[acc] = seq.translate(None, b" \t\r\n")
            if time.time() - last > 5:
                last = time.time()
                say(f"{path}: {raw.tell() / path.stat().st_size:.0%} read, {len(seqs):,} accessions found", start)
    return seqs


def assemble(seqs: dict, lists: dict) -> dict:
    """split -> the split's FASTA text (`>ACCESSION`, the sequence on one line), after checking that seqs holds
    every record of the split with its sequence; raises ValueError naming the accessions that fail."""
    def named(accs):
        more = f" and {len(accs) - 10:,} more" if len(accs) > 10 else ""
        return ", ".join(a.decode() for a in accs[:10]) + more
    records = [r for split in SPLITS for r in lists[split]]
    missing = [acc for acc, _ in records if acc not in seqs]
    if missing:
        raise ValueError(f"lacks {len(missing):,} of sp2014's {len(records):,} accessions: {named(missing)}")
    changed = [acc for acc, c in records if check(seqs[acc]) != c]
    if changed:
        raise ValueError(f"holds another sequence than sp2014's under {len(changed):,} accessions: {named(changed)}")
    texts = {split: b"".join(b">%s\n%s\n" % (acc, seqs[acc]) for acc, _ in lists[split]) for split in SPLITS}
    for split, text in texts.items():
        if hashlib.sha256(text).hexdigest() != SHA256[split]:
            raise ValueError(f"holds other sequences than sp2014's in its {split} split (its sha256 differs), under "
                             "accessions the per-sequence checks could not name")
    return texts


def fetch_deb(folder: str) -> Path:
    if not shutil.which("apt-get"):
        sys.exit("sp2014.py: error: no --source given and no apt-get to download it with; give --source FILE")
    if subprocess.run(["apt-get", "download", PACKAGE], cwd=folder).returncode:
        sys.exit(f"sp2014.py: error: `apt-get download {PACKAGE}` failed (after apt-get update? is Debian "
                 "bookworm's main in the apt sources?); download the .deb or a source named in --help and give --source FILE")
    return next(Path(folder).glob("*.deb"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, help="metastudent-data's .deb or a FASTA file; default: apt-get download "
                                               f"{PACKAGE}")
    p.add_argument("--out", type=Path, required=True, help="folder for the shards and manifest.json")
    args = p.parse_args(argv)
    if args.source is not None and not args.source.is_file():
        p.error(f"{args.source}: no such file")
    if args.out.exists() and not (args.out.is_dir() and all(
            f.name == "manifest.json" or f.match("sp2014_*.bin") or f.match("sp2014_train_*.clusters")
            for f in args.out.iterdir())):  # before the long work
        p.error(f"{args.out} holds other files than sp2014 shards, cluster files and manifest.json: give a new "
                "folder, or one of an earlier build")
    start = time.time()
    lists = read_split()
    clusters = read_clusters()
    wanted = {acc for split in SPLITS for acc, _ in lists[split]}
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source or fetch_deb(tmp)
        try:
            with open(source, "rb") as f:
                deb = f.read(8) == b"!<arch>\n"  # the ar magic
            seqs = (read_deb if deb else read_fasta)(source, wanted, start)
            say(f"{source}: {len(seqs):,} of sp2014's {len(wanted):,} accessions found; checking, assembling", start)
            texts = assemble(seqs, lists)
        except (ValueError, OSError, EOFError, lzma.LZMAError, tarfile.TarError) as e:
            sys.exit(f"sp2014.py: error: {source}: {e}")
        del seqs
        paths = {split: Path(tmp) / f"sp2014_{split}.fasta" for split in SPLITS}
        for split in SPLITS:
            paths[split].write_bytes(texts[split])
        del texts
        tsv = Path(tmp) / "clusters.tsv"  # the clusters as prepare.py reads them, each named by its number
        tsv.write_bytes(b"".join(b"%d\t%s\n" % (n, acc) for n, (acc, _) in zip(clusters, lists["train"])))
        say("split assembled and checked; tokenizing", start)
        # prepare.py builds beside --out and swaps it in only when complete: a failure leaves --out as it was
        manifest = prepare.main([f"--{s}={paths[s]}" for s in SPLITS] +
                                [f"--clusters={tsv}", "--name=sp2014", f"--out={args.out}"])
    manifest["source"] = {"sp2014": str(source.resolve()) if args.source else PACKAGE,  # not the temporary files
                          "clusters": f"data/{CLUSTERS}"}
    write_manifest(args.out, manifest)
    say(f"{args.out}: sp2014 shards written", start)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"sp2014.py: error: {e}")
