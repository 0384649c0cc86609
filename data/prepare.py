"""Tokenize protein sequences into shards `{name}_{split}_{NNNNNN}.bin` plus a manifest.json.

    python data/prepare.py --fasta proteins.fasta.xz --out data/mine --name mine        # split 10k/10k/rest, seeded
    python data/prepare.py --train a.fasta.xz --valid b.fasta --test c.fasta --out data/sp2014 --name sp2014
    python data/prepare.py --hf_dataset tattabio/OMG_prot50 --out data/omg --name omg_prot50
    python data/prepare.py --train a.fasta.xz --valid b.fasta --test c.fasta --clusters a_clusters.tsv.xz ...

FASTA may be plain, .gz or .xz. Residues are upper-cased; characters outside the ESM-2 vocabulary become <unk> and
are counted. Sequences are stored whole. A single source without splits is split by a generator seeded with
--seed: --num_valid + --num_test record indices drawn without replacement (the first --num_valid of them valid).

--clusters TSV (plain, .gz or .xz; `representative<TAB>member` per line, as mmseqs writes it, or UniRef50 -> UniRef90
memberships) writes beside each training shard its cluster file (dataloader.py describes it), for sampling one
member per cluster (TrainLoader's sample_by_cluster); the shards themselves are the same bytes as without it. A
record's accession is the first word of its header, or ACC for UniProt's `>sp|ACC|NAME` (the TSV's ids are read the
same way). Clusters are numbered in the order the training split first meets them, so the files depend on the
clustering only, not on the TSV's line order (mmseqs's is thread-dependent). A training record that is no member in
the TSV is refused, not made a cluster of its own: it means the TSV belongs to other data.

Everything is written into a new folder `.{out name}.{random}.tmp` beside --out, which takes --out's place only when
every input has been read: a failure leaves an existing --out exactly as it was and a new one absent (a killed run
may leave its .tmp folder behind; delete it). As --out is replaced whole, an existing --out may hold only what an
earlier run with the same --name made (its shards and manifest.json); anything else there is refused, not deleted.
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import collections
import gzip
import lzma
import multiprocessing
import os
import re
import shlex
import shutil
import time
import uuid

import numpy as np

from dataloader import CLS, EOS, UNK, VOCAB, cluster_file, write_file, write_manifest, write_shard

SPLITS = ("train", "valid", "test")
READ_BYTES = 8 << 20  # FASTA is cut into blocks of whole records of about this size, one job each
HF_ROWS = 20_000      # rows of a Hugging Face dataset per job
TABLE = bytearray([UNK]) * 256
for token, letter in enumerate(VOCAB):
    if len(letter) == 1:
        TABLE[ord(letter)] = TABLE[ord(letter.lower())] = token
TABLE = bytes(TABLE)
WHITESPACE = b" \t\r\n"
HELD_OUT = {}  # record index -> split, for a source split here; set in every worker by the pool initializer


def open_input(path: Path):
    """(decompressed binary stream, raw file) so progress can follow the raw file's position."""
    raw = open(path, "rb")
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix)
    return (opener(raw) if opener else raw), raw


def fasta_blocks(path: Path):
    """Yield (first line number, raw position, block of whole records starting with '>')."""
    try:
        yield from read_blocks(path)
    except (OSError, EOFError, lzma.LZMAError) as e:  # e.g. a damaged .gz or .xz
        raise ValueError(f"{path}: cannot read it: {e}") from None


def read_blocks(path: Path):
    stream, raw = open_input(path)
    with raw, stream:
        buf, line = stream.read(READ_BYTES), 1
        stripped = buf.lstrip()
        line += buf[:len(buf) - len(stripped)].count(b"\n")
        buf = stripped
        if not buf:
            raise ValueError(f"{path}: empty file, no FASTA records")
        if not buf.startswith(b">"):
            first = buf.split(b"\n", 1)[0][:60]
            raise ValueError(f"{path}:{line}: not a FASTA file: expected a '>' header line, found {first!r}")
        while buf:
            more = stream.read(READ_BYTES)
            buf += more
            cut = buf.rfind(b"\n>") + 1 if more else len(buf)
            if cut <= 0:
                continue
            yield line, raw.tell(), buf[:cut]
            line += buf.count(b"\n", 0, cut)
            buf = buf[cut:]


def fasta_records(block: bytes) -> tuple[list[bytes], list[bytes]]:
    """The accessions and the sequence parts of the records of a block."""
    records = [r.split(b"\n", 1) for r in block[1:].split(b"\n>")]
    return [accession(r[0]) for r in records], [r[1] if len(r) > 1 else b"" for r in records]


def accession(header: bytes) -> bytes:
    """The first word of a FASTA header (or an mmseqs id), or ACC for UniProt's `sp|ACC|NAME` and `tr|ACC|NAME`."""
    word = (header.split(None, 1) or [b""])[0]
    fields = word.split(b"|")
    return fields[1] if len(fields) == 3 and fields[0] in (b"sp", b"tr") else word


def empty_record_line(block: bytes, first_line: int, k: int) -> int:
    """Line number of the header of record k of a block (only for error messages)."""
    pos = -1
    for _ in range(k):
        pos = block.index(b"\n>", pos + 1)
    return first_line + block.count(b"\n", 0, pos + 1)


def encode(job):
    """Tokenize one job: per split, the documents `<cls> residues <eos>` back to back, their lengths and their
    accessions (None for a Hugging Face dataset's rows)."""
    label, first_line, first_record, payload, split = job
    if isinstance(payload, bytes):
        names, seqs = fasta_records(payload)
    else:
        names, seqs = [None] * len(payload), [s.encode("ascii", "replace") for s in payload]
    docs, accessions = {s: [] for s in SPLITS}, {s: [] for s in SPLITS}
    unknown = 0
    for k, seq in enumerate(seqs):
        tokens = seq.translate(TABLE, WHITESPACE)
        if not tokens:
            where = (f"{label}:{empty_record_line(payload, first_line, k)}" if isinstance(payload, bytes)
                     else f"{label}, row {first_record + k}")
            raise ValueError(f"{where}: a record with no residues; remove it or fix the file")
        unknown += tokens.count(UNK)
        to = split or HELD_OUT.get(first_record + k, "train")
        docs[to].append(tokens)
        accessions[to].append(names[k])
    return {s: (b"".join(bytes([CLS]) + d + bytes([EOS]) for d in docs[s]), np.array([len(d) + 2 for d in docs[s]]),
                accessions[s]) for s in SPLITS if docs[s]}, unknown, len(seqs)


class Clusters:
    """The TSV's clusters: member accession -> representative, and the id of each cluster the training split has
    met so far (ids 0, 1, ... in the order it meets them)."""

    def __init__(self, path: Path):
        self.path, self.representative, self.index = path, {}, {}
        try:
            stream, raw = open_input(path)
            with raw, stream:
                for line_number, line in enumerate(stream, 1):
                    fields = line.rstrip(b"\r\n").split(b"\t")
                    if len(fields) != 2:
                        raise ValueError(f"{path}:{line_number}: expected representative<TAB>member, found "
                                         f"{line[:60]!r}")
                    representative, member = map(accession, fields)
                    if self.representative.setdefault(member, representative) != representative:
                        raise ValueError(f"{path}:{line_number}: {member.decode()} is a member of two clusters "
                                         f"({self.representative[member].decode()} and {representative.decode()})")
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise ValueError(f"{path}: cannot read it: {e}") from None

    def ids(self, accessions: list) -> np.ndarray:
        """The cluster id of each training record."""
        missing = [a.decode(errors="replace") for a in accessions if a not in self.representative]
        if missing:
            raise ValueError(f"training record(s) {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} "
                             f"are no member in --clusters {self.path}; give the TSV of these data, in which every "
                             "training record is a member of one cluster")
        return np.array([self.index.setdefault(self.representative[a], len(self.index)) for a in accessions],
                        dtype=np.int32)


class ShardWriter:
    """Fills shards of about `limit` tokens with whole documents (a longer document gets a shard of its own)."""

    def __init__(self, out: Path, name: str, split: str, limit: int):
        self.out, self.prefix, self.limit = out, f"{name}_{split}", limit
        self.parts, self.ids, self.size, self.sequences, self.shards = [], [], 0, 0, []

    def add(self, tokens: bytes, lengths: np.ndarray, ids=None):
        """Append documents (with the cluster id of each, if given: then of every document)."""
        ends = np.cumsum(lengths)
        done = 0  # documents of this chunk already placed
        while done < len(lengths):
            offset = ends[done - 1] if done else 0
            fit = int(np.searchsorted(ends, offset + self.limit - self.size, side="right")) - done
            if fit == 0 and self.size:
                self.flush()
                continue
            fit = max(fit, 1)
            self.parts.append(tokens[offset:ends[done + fit - 1]])
            if ids is not None:
                self.ids.append(ids[done:done + fit])
            self.size += int(ends[done + fit - 1] - offset)
            self.sequences += fit
            done += fit

    def flush(self):
        if self.size:
            path = self.out / f"{self.prefix}_{len(self.shards):06d}.bin"
            sha = write_shard(path, b"".join(self.parts))
            self.shards.append({"file": path.name, "tokens": self.size, "sha256": sha})
            if self.ids:
                ids = cluster_file(path)
                sha = write_file(ids, np.concatenate(self.ids).astype("<i4").tobytes())
                self.shards[-1]["clusters"] = {"file": ids.name, "sha256": sha}
            self.parts, self.ids, self.size = [], [], 0

    def summary(self) -> dict:
        return {"sequences": self.sequences, "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


def held_out(n: int, num_valid: int, num_test: int, seed: int, label: str) -> dict:
    """Record index -> 'valid' or 'test' for the seeded split of a source of n records."""
    if n <= num_valid + num_test:
        raise ValueError(f"{label} has {n:,} sequences: too few for --num_valid {num_valid} + --num_test {num_test} "
                         "and a training split")
    chosen = np.random.default_rng(seed).choice(n, size=num_valid + num_test, replace=False).tolist()
    return {i: "valid" if k < num_valid else "test" for k, i in enumerate(chosen)}


def count_fasta(path: Path, progress) -> int:
    progress.label, count = f"{path} (counting its records for the split)", 0
    for _, position, block in fasta_blocks(path):
        count += block.count(b"\n>") + 1
        progress.read = position / max(path.stat().st_size, 1)
        progress.show()
    return count


def fasta_jobs(path: Path, split, progress):
    record = 0
    for line, position, block in fasta_blocks(path):
        progress.read = position / max(path.stat().st_size, 1)
        yield str(path), line, record, block, split
        record += block.count(b"\n>") + 1


def hf_jobs(ds, label: str, split, progress):
    record = 0
    for rows in ds.select_columns(["sequence"]).iter(batch_size=HF_ROWS):
        yield label, None, record, rows["sequence"], split
        record += len(rows["sequence"])


def hf_sources(name: str, args):
    """[(streamed dataset, label, split or None if split here)] of a Hugging Face dataset, and the held-out map."""
    import datasets
    found = datasets.load_dataset(name, streaming=True)
    for split_name, ds in found.items():
        if "sequence" not in (ds.column_names or ["sequence"]):  # column names may be known only when read
            raise ValueError(f"{name} [{split_name}] has no 'sequence' column (columns: {ds.column_names})")
    aliases = {"train": "train", "valid": "valid", "validation": "valid", "test": "test"}
    splits = {aliases[s]: ds for s, ds in found.items() if s in aliases}
    if set(splits) == set(SPLITS):
        return [(splits[s], f"{name} [{s}]", s) for s in SPLITS], {}
    if len(found) != 1:
        raise ValueError(f"{name} has splits {list(found)}: expected one split, or train/valid(ation)/test")
    (split_name, ds), = found.items()
    label = f"{name} [{split_name}]"
    info = ds.info.splits[split_name].num_examples if ds.info.splits and split_name in ds.info.splits else None
    n = info or sum(len(rows["sequence"]) for rows in ds.select_columns(["sequence"]).iter(batch_size=HF_ROWS))
    return [(ds, label, None)], held_out(n, args.num_valid, args.num_test, args.seed, label)


class Progress:
    """A line on stderr every few seconds: how far the input has been read (FASTA only) and what is tokenized."""

    def __init__(self):
        self.start = self.last = time.time()
        self.label, self.read, self.sequences, self.tokens = "", None, 0, 0

    def show(self):
        now = time.time()
        if now - self.last > 5:
            self.last = now
            read = f", {100 * self.read:.0f}% read" if self.read is not None else ""
            print(f"  {self.label}{read}: {self.sequences:,} sequences, {self.tokens:,} tokens tokenized so far, "
                  f"{now - self.start:.0f} s", file=sys.stderr, flush=True)


def run_jobs(jobs, writers, workers: int, progress: Progress, clusters: Clusters | None) -> int:
    """Encode jobs over a pool (at most 2 jobs per worker in flight, so input is never all in memory); returns the
    unknown-character count. Results are taken in job order, so cluster ids do not depend on the worker count."""
    unknown = 0

    def take(result):
        nonlocal unknown
        docs, unk, _ = result
        for split, (tokens, lengths, accessions) in docs.items():
            writers[split].add(tokens, lengths, clusters.ids(accessions) if clusters and split == "train" else None)
            progress.sequences += len(lengths)
            progress.tokens += len(tokens)
        progress.show()
        unknown += unk

    if workers == 1:
        for job in jobs:
            take(encode(job))
        return unknown
    with multiprocessing.get_context("fork").Pool(workers) as pool:  # forked workers inherit HELD_OUT
        pending = collections.deque()
        for job in jobs:
            pending.append(pool.apply_async(encode, (job,)))
            if len(pending) >= 2 * workers:
                take(pending.popleft().get())
        while pending:
            take(pending.popleft().get())
    return unknown


def check_out(out: Path, name: str) -> None:
    """Refuse an --out whose replacement would delete files that are not this dataset's outputs."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    ours = re.compile(rf"{re.escape(name)}_(({'|'.join(SPLITS)})_\d{{6}}\.bin|train_\d{{6}}\.clusters)|manifest\.json")
    foreign = sorted(f.name for f in out.iterdir() if not ours.fullmatch(f.name))
    if foreign:
        raise ValueError(f"--out {out} holds files that are not --name {name} shards, cluster files or manifest.json "
                         f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); this script replaces the "
                         "whole folder, so give a new or empty folder, or move those files away")


def replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder tmp in out's place. The old out is renamed aside before it is deleted, so that at no
    moment does a folder hold a mix of old and new files (a crash in between leaves it under the .old name)."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = tmp.with_suffix(".old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fasta", type=Path, help="one FASTA file (plain, .gz or .xz), split here")
    p.add_argument("--train", type=Path, help="already split FASTA files: --train, --valid and --test together")
    p.add_argument("--valid", type=Path)
    p.add_argument("--test", type=Path)
    p.add_argument("--hf_dataset", nargs="?", const="tattabio/OMG_prot50",
                   help="Hugging Face dataset (name or local folder) with a 'sequence' column; "
                        "default tattabio/OMG_prot50")
    p.add_argument("--out", type=Path, required=True, help="folder for the shards and manifest.json")
    p.add_argument("--name", required=True, help="shard name prefix: NAME_train_000000.bin ...")
    p.add_argument("--num_valid", type=int, default=10_000, help="sequences held out for validation if split here")
    p.add_argument("--num_test", type=int, default=10_000, help="sequences held out for test if split here")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizing processes")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard (about)")
    p.add_argument("--clusters", type=Path, help="cluster TSV (representative<TAB>member) of the FASTA records: "
                                                 "writes each training shard's cluster file")
    args = p.parse_args(argv)
    given = [args.fasta is not None, any(x is not None for x in (args.train, args.valid, args.test)),
             args.hf_dataset is not None]
    if sum(given) != 1 or (given[1] and None in (args.train, args.valid, args.test)):
        p.error("give exactly one source: --fasta FILE, or --train FILE --valid FILE --test FILE, or --hf_dataset NAME")
    if min(args.num_valid, args.num_test) < 0 or args.workers < 1 or args.shard_tokens < 1:
        p.error("--num_valid and --num_test must be >= 0, --workers and --shard_tokens >= 1")
    if args.clusters and args.hf_dataset:
        p.error("--clusters needs FASTA input: records are matched to the TSV by their accessions")
    for path in (args.fasta, args.train, args.valid, args.test, args.clusters):
        if path is not None and not path.is_file():
            p.error(f"{path}: no such file")

    out = args.out.resolve()  # through a symbolic link, so that the new folder is made where the old one is
    check_out(out, args.name)  # before any work
    progress = Progress()
    if args.hf_dataset:
        sources, held = hf_sources(args.hf_dataset, args)
        sources = [(lambda ds=ds, label=label, split=split: hf_jobs(ds, label, split, progress), label)
                   for ds, label, split in sources]
        source = {"hf_dataset": args.hf_dataset}
    elif args.fasta:
        held = held_out(count_fasta(args.fasta, progress), args.num_valid, args.num_test, args.seed, str(args.fasta))
        sources = [(lambda: fasta_jobs(args.fasta, None, progress), str(args.fasta))]
        source = {"fasta": str(args.fasta)}
    else:
        held = {}
        sources = [(lambda s=s: fasta_jobs(getattr(args, s), s, progress), str(getattr(args, s))) for s in SPLITS]
        source = {s: str(getattr(args, s)) for s in SPLITS}
    if held:
        source.update(seed=args.seed, num_valid=args.num_valid, num_test=args.num_test)
    clusters = None
    if args.clusters:
        clusters = Clusters(args.clusters)
        source["clusters"] = str(args.clusters)
    HELD_OUT.clear()
    HELD_OUT.update(held)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"  # a name no other run can be using
    tmp.mkdir()
    try:
        if out.is_dir():  # the new folder keeps the old one's permissions
            tmp.chmod(out.stat().st_mode)
        writers = {s: ShardWriter(tmp, args.name, s, args.shard_tokens) for s in SPLITS}
        unknown = 0
        for jobs, label in sources:
            progress.label, progress.read = label, None
            unknown += run_jobs(jobs(), writers, args.workers, progress, clusters)
        for w in writers.values():
            w.flush()
        manifest = {"name": args.name, "source": source, "splits": {s: w.summary() for s, w in writers.items()},
                    "unknown_characters": unknown, "command": shlex.join(["python"] + sys.argv)}
        if clusters:  # the documents of an epoch sampled by cluster
            manifest["splits"]["train"]["clusters"] = len(clusters.index)
        write_manifest(tmp, manifest)
        check_out(out, args.name)  # again: files may have appeared in --out while this ran
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    counts = ", ".join(f"{s} {w.sequences:,} sequences / {w.summary()['tokens']:,} tokens in {len(w.shards)} shards"
                       for s, w in writers.items())
    clustered = f"; the training records in {len(clusters.index):,} clusters" if clusters else ""
    print(f"wrote {args.out}: {counts}{clustered}; {unknown:,} unknown characters -> <unk>; "
          f"{time.time() - progress.start:.1f} s in all")
    return manifest


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"prepare.py: error: {e}")
