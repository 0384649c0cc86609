"""Vocabulary, shard format, the multi-worker training loader that masks on the fly, the frozen evaluation batches
and the letter-frequency baseline on them.

A shard `{name}_{split}_{NNNNNN}.bin` is a header of 256 little-endian int32 (magic 20240520, version 1, token
count, zeros) followed by one uint8 per token: documents `<cls> residues <eos>` back to back (the format of the
public Synthyra/omg_prot50_packed files).

A training shard made with `prepare.py --clusters` has a cluster file beside it, `{name}_train_{NNNNNN}.clusters`:
one little-endian int32 per document of the shard, in shard order, the id of the document's cluster (ids are
shared by all the shards of a folder). TrainLoader(sample_by_cluster=True) reads them.
"""
import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N",
         "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>"]
CLS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 32
STANDARD_AA = (4, 24)  # tokens 4..23: the 20 standard amino acids, the random replacements of 80/10/10
MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = 4 * HEADER_INTS
BLOCK = 128  # FlexAttention block size: micro-batches are a multiple of it
PREPARE_HINT = ("make shards with: python data/prepare.py --fasta FILE --out DIR "
                "(or python data/download_omgprot50.py --out DIR)")


def write_file(path, data: bytes) -> str:
    """Write data and return its sha256. A temporary name and a rename mean a crash never leaves a file that looks
    complete."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def write_shard(path, tokens) -> str:
    """Write tokens (uint8 array or bytes) as a shard and return its sha256."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    return write_file(path, header.tobytes() + bytes(tokens))


def cluster_file(shard) -> Path:
    return Path(shard).with_suffix(".clusters")


def write_manifest(folder, manifest: dict) -> None:
    """A shard folder's manifest.json, written like a shard: under a temporary name, then renamed."""
    tmp = Path(folder) / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, Path(folder) / "manifest.json")


def shard_tokens(path) -> int:
    """Token count from a shard's header, after checking magic, version and file size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} does not exist; {PREPARE_HINT}")
    size = path.stat().st_size
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS) if size >= HEADER_BYTES else None
    if header is None or header[0] != MAGIC:
        raise ValueError(f"{path} is not a token shard (no magic number {MAGIC} in its first 4 bytes); {PREPARE_HINT}")
    if header[1] != VERSION:
        raise ValueError(f"{path} has shard format version {header[1]}, this code reads version {VERSION}; "
                         f"remake it with this checkout's data/prepare.py")
    if size != HEADER_BYTES + int(header[2]):
        raise ValueError(f"{path} is truncated or corrupt: its header says {header[2]:,} tokens but the file holds "
                         f"{size - HEADER_BYTES:,} bytes after the header; delete it and download or prepare it again")
    return int(header[2])


def read_shard(path) -> np.ndarray:
    """The tokens of a shard as a read-only uint8 memmap (the header checked first)."""
    n = shard_tokens(path)
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    tokens = np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_BYTES, shape=(n,))
    if tokens[0] != CLS:
        raise ValueError(f"{path}: the first token is {tokens[0]}, not <cls> ({CLS}); documents must be "
                         f"<cls> residues <eos>; {PREPARE_HINT}")
    return tokens


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def verified_fingerprint(folder) -> str:
    """The data fingerprint of a shard folder (a sha256 of the shard names and sha256s its manifest.json lists,
    the same wherever the data were made) once every *.bin and *.clusters there is found listed and unchanged:
    the fingerprint a run logs then describes what it trained on. The cluster files are checked but left out of
    the fingerprint, so that adding them keeps a folder's fingerprint, and with it its track and its logs; a run
    that samples by cluster says so in its hyperparameters. Files are hashed in threads (hashlib lets go of the
    GIL)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        shards = [s for split in ("train", "valid", "test") for s in manifest["splits"][split]["shards"]]
        listed = {s["file"]: s["sha256"] for s in shards}
        clusters = {s["clusters"]["file"]: s["clusters"]["sha256"] for s in shards if "clusters" in s}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder}/manifest.json is missing or unreadable ({type(e).__name__}: {e}); "
                         f"remake the folder: {PREPARE_HINT}") from None
    remake = f"remake the folder with: {manifest['command']}" if manifest.get("command") else PREPARE_HINT
    kinds = [("shard(s)", "*.bin", listed), ("cluster file(s)", "*.clusters", clusters)]
    for what, pattern, files in kinds:
        found = {p.name for p in folder.glob(pattern)}
        for problem, names in [("not listed in its manifest.json", found - files.keys()),
                               ("listed in its manifest.json but missing", files.keys() - found)]:
            if names:
                raise ValueError(f"{folder}: {what} {', '.join(sorted(names))} {problem}; {remake}")
    every = {**listed, **clusters}
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        hashes = dict(zip(every, pool.map(file_sha256, [folder / name for name in every])))
    for what, _, files in kinds:
        changed = sorted(name for name, sha in files.items() if hashes[name] != sha)
        if changed:
            raise ValueError(f"{folder}: {what} {', '.join(changed)} changed since they were made (their sha256 is "
                             f"not the one manifest.json lists); {remake}")
    return hashlib.sha256(json.dumps(list(listed.items())).encode()).hexdigest()


def documents(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets and lengths of the documents of a shard (each starts with <cls>)."""
    starts = np.flatnonzero(tokens == CLS)
    return starts, np.diff(starts, append=len(tokens))


class Batch(NamedTuple):
    input_ids: torch.Tensor  # int32 [T], tokens after masking
    doc_ids: torch.Tensor    # int32 [T], non-decreasing; equal ids = one document piece (each <pad> its own)
    mask_idx: torch.Tensor   # int64 [M], positions to predict; padding slots point at position 0
    targets: torch.Tensor    # int64 [M], original tokens at mask_idx; -100 on padding slots

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in self))


def check_tokens_per_batch(tokens: int, max_len: int) -> None:
    if tokens <= 0 or tokens % BLOCK or tokens < max_len:
        raise ValueError(f"tokens per batch must be a positive multiple of {BLOCK} (the FlexAttention block) and "
                         f">= max_len ({max_len}) so a whole document fits; got {tokens}")


def pack(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Greedy packing of documents in order (each no longer than capacity): boundaries b, buffer k holding
    documents b[k]:b[k+1]."""
    ends = np.cumsum(lengths)
    bounds, j = [0], 0
    while j < len(lengths):
        j = int(np.searchsorted(ends, (ends[j - 1] if j else 0) + capacity, side="right"))
        bounds.append(j)
    return np.array(bounds)


def block_aligned_order(lengths: np.ndarray) -> np.ndarray:
    """An order of one buffer's documents that greedily starts many of them on a FlexAttention block boundary.

    FlexAttention computes a whole block pair (128 queries x 128 keys) whenever one document spans both blocks, so a
    document that shares a block with its neighbour is computed against all of the neighbour's blocks too: packed in
    the shuffled order, a third of the attention work on sp2014 is masked out again. Longest first, each step closes
    the open block with one document, else with two, else takes the longest left. A document's logits do not depend
    on its place in the buffer, so only the wasted work changes (and which positions the masks are drawn at)."""
    sizes = lengths.tolist()
    residue = [n % BLOCK for n in sizes]
    left = sorted(range(len(sizes)), key=lambda i: -sizes[i])  # longest first, ties in packed order

    def closing(need: int):  # the longest document left that closes the open block, else the first pair that does
        one = next((i for i in left if residue[i] == need), None)
        if one is not None:
            return [one]
        longest_with = {}  # residue -> the longest document left with it
        for i in left:
            j = longest_with.get((need - residue[i]) % BLOCK)
            if j is not None:
                return [j, i]
            longest_with.setdefault(residue[i], i)
        return None

    order, offset = [], 0
    while left:
        need = -offset % BLOCK
        for i in (need and closing(need)) or left[:1]:
            left.remove(i)
            order.append(i)
            offset += sizes[i]
    return np.array(order, dtype=np.int64)


def assemble(pieces: list, lengths: np.ndarray, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Token and doc-id buffers of `tokens` entries holding the pieces back to back. Each <pad> of the tail is a
    document of its own: it attends to itself alone, so padding costs no attention and never has a position past 0
    (a last evaluation batch can be mostly padding)."""
    ids = np.full(tokens, PAD, dtype=np.int32)
    used = int(lengths.sum())
    ids[:used] = np.concatenate(pieces) if pieces else []
    doc_ids = np.arange(len(lengths) - used, len(lengths) - used + tokens, dtype=np.int32)
    doc_ids[:used] = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    return ids, doc_ids


def to_batch(ids, doc_ids, mask_idx, targets, m: int) -> Batch:
    """A Batch with mask_idx/targets padded to the static length m (position 0, target -100)."""
    idx = np.zeros(m, dtype=np.int64)
    tgt = np.full(m, -100, dtype=np.int64)
    idx[:len(mask_idx)], tgt[:len(targets)] = mask_idx, targets
    return Batch(*(torch.from_numpy(a) for a in (ids, doc_ids, idx, tgt)))


def replace_80_10_10(ids: np.ndarray, chosen: np.ndarray, rng: np.random.Generator) -> None:
    """Of the chosen positions (in random order): the first 80% become <mask>, the next 10% a random standard
    amino acid, the rest stay unchanged (exact proportions, so every batch has the same mix)."""
    n_mask, n_random = round(0.8 * len(chosen)), round(0.1 * len(chosen))
    ids[chosen[:n_mask]] = MASK
    ids[chosen[n_mask:n_mask + n_random]] = rng.integers(*STANDARD_AA, size=n_random)


# ----------------------------------------------------------------------------------------------------------------
# training stream
#
# The stream of global micro-batches is cut as follows. Epoch e permutes the shards (seed, e); the permutation is
# read in groups of GROUP_SHARDS consecutive shards; a group's documents are shuffled and cropped with a generator
# seeded by (seed, e, group), then packed greedily into micro-batches, and each micro-batch's documents are put
# in block_aligned_order. A micro-batch is named by its cursor (epoch, group, batch-in-group) and its masks are
# drawn from (seed, epoch, group, batch), so any worker can build it from the cursor alone, and the stream depends
# on neither world size nor worker count. Only one group's document index is held at a time (a few shards' worth:
# ~1M documents), never the whole dataset's, and a resumed run needs only the cursor it stopped at.
#
# Sampling by cluster (as ESM-2 trains on UniRef50: a cluster, then one of its members) keeps all of that and only
# thins each group: epoch e first draws one member of every cluster with a generator seeded by (seed, e), and a
# group keeps the picks among its shards' documents. The picks span all shards, so the cluster id of every document
# is held (4 bytes each); they are a pure function of (seed, epoch), and the cursor still names a micro-batch.
GROUP_SHARDS = 4


def cluster_sha256s(folder) -> list[str]:
    """The sha256 of each training shard's cluster file, as the folder's manifest.json lists them: what a run that
    samples by cluster names, since the data fingerprint covers the shards only."""
    shards = json.loads((Path(folder) / "manifest.json").read_text())["splits"]["train"]["shards"]
    if not all("clusters" in s for s in shards):
        raise ValueError(f"--sample_by_cluster needs the training documents' clusters, and {folder} was made without "
                         f"them; remake it with data/prepare.py --clusters TSV (sp2014's: data/sp2014.py)")
    return [s["clusters"]["sha256"] for s in shards]


def cluster_members(files) -> tuple:
    """For the shards' cluster files: (first document of each shard in a numbering over all shards in order,
    every document sorted by cluster, where each cluster starts in that order, each cluster's size)."""
    ids = []
    for f in files:
        path = cluster_file(f)
        if not path.is_file():
            raise ValueError(f"{f} has no cluster file {path.name} beside it; sampling by cluster needs shards made "
                             f"with data/prepare.py --clusters TSV (sp2014's: data/sp2014.py)")
        docs = len(documents(read_shard(f))[0])
        if path.stat().st_size != 4 * docs:
            raise ValueError(f"{path} holds {path.stat().st_size:,} bytes, not 4 for each of the {docs:,} documents "
                             f"of {Path(f).name}; remake the folder with data/prepare.py --clusters TSV")
        ids.append(np.fromfile(path, dtype="<i4"))
    offsets = np.cumsum([0] + [len(i) for i in ids])
    ids = np.concatenate(ids)
    by_cluster = np.argsort(ids, kind="stable")
    _, first, sizes = np.unique(ids[by_cluster], return_index=True, return_counts=True)
    return offsets, by_cluster, first, sizes


class TrainStream(torch.utils.data.IterableDataset):
    def __init__(self, files, tokens, world_size, seed, max_len, mask_rate, mask_scheme, sample_by_cluster):
        self.files, self.tokens, self.world_size, self.seed = [str(f) for f in files], tokens, world_size, seed
        self.max_len, self.mask_rate, self.mask_scheme = max_len, mask_rate, mask_scheme
        self.clusters = cluster_members(self.files) if sample_by_cluster else None
        self.m = math.ceil(mask_rate * tokens)
        self.groups = math.ceil(len(self.files) / GROUP_SHARDS)
        self.start = (0, 0, 0)  # cursor of this rank's next micro-batch, set by the loader before workers start
        self.plan_key, self.plan, self.shards = None, None, {}

    def group_plan(self, epoch: int, group: int):
        """(shard of each document, start, length, packing boundaries) of one group, documents in packed order."""
        if self.plan_key != (epoch, group):
            order = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.files))
            chosen = order[group * GROUP_SHARDS:(group + 1) * GROUP_SHARDS]
            found = [documents(self.shard(i)) for i in chosen]
            shard = np.repeat(chosen, [len(s) for s, _ in found])
            start = np.concatenate([s for s, _ in found])
            length = np.concatenate([n for _, n in found])
            if self.clusters is not None:
                picked = self.picks(epoch)
                offsets = self.clusters[0]
                keep = np.concatenate([picked[offsets[i]:offsets[i + 1]] for i in chosen])
                shard, start, length = shard[keep], start[keep], length[keep]
            rng = np.random.default_rng([self.seed, 1, epoch, group])
            perm = rng.permutation(len(start))
            shard, start, length = shard[perm], start[perm], length[perm]
            # a crop at a random offset keeps <cls> only if it includes the start and <eos> only if it includes the end
            excess = np.maximum(length - self.max_len, 0)
            start = start + (rng.random(len(start)) * (excess + 1)).astype(np.int64)
            length = np.minimum(length, self.max_len)
            self.plan_key, self.plan = (epoch, group), (shard, start, length, pack(length, self.tokens))
        return self.plan

    def picks(self, epoch: int) -> np.ndarray:
        """Whether each document (numbered over all shards) is its cluster's pick in this epoch: one member of each
        cluster, uniformly at random."""
        offsets, by_cluster, first, sizes = self.clusters
        rng = np.random.default_rng([self.seed, 3, epoch])
        picked = np.zeros(offsets[-1], dtype=bool)
        picked[by_cluster[first + rng.integers(sizes)]] = True
        return picked

    def shard(self, i: int) -> np.ndarray:
        if i not in self.shards:  # a plain ndarray view of the memmap: slicing it is cheaper
            self.shards[i] = read_shard(self.files[i]).view(np.ndarray)
        return self.shards[i]

    def __getstate__(self):  # workers started by spawn or forkserver get no copy of the caches
        return {**self.__dict__, "plan_key": None, "plan": None, "shards": {}}

    def advance(self, cursor, n: int):
        """The cursor n micro-batches further along the global stream."""
        epoch, group, b = cursor
        while True:
            left = len(self.group_plan(epoch, group)[3]) - 1 - b
            if n < left:
                return epoch, group, b + n
            n -= left
            epoch, group, b = (epoch, group + 1, 0) if group + 1 < self.groups else (epoch + 1, 0, 0)

    def build(self, cursor) -> Batch:
        epoch, group, b = cursor
        shard, start, length, bounds = self.group_plan(epoch, group)
        docs = np.arange(bounds[b], bounds[b + 1])
        docs = docs[block_aligned_order(length[docs])]
        pieces = [self.shard(s)[i:i + n] for s, i, n in zip(shard[docs].tolist(), start[docs].tolist(),
                                                             length[docs].tolist())]
        ids, doc_ids = assemble(pieces, length[docs], self.tokens)
        rng = np.random.default_rng([self.seed, 2, epoch, group, b])
        maskable = np.flatnonzero((ids >= UNK) & (ids < MASK))
        chosen = maskable[rng.permutation(len(maskable))[:round(self.mask_rate * len(maskable))]]
        targets = ids[chosen].astype(np.int64)
        if self.mask_scheme == "mask":
            ids[chosen] = MASK
        else:
            replace_80_10_10(ids, chosen, rng)
        order = np.argsort(chosen)
        return to_batch(ids, doc_ids, chosen[order], targets[order], self.m)

    def __iter__(self):
        """Worker w of k yields this rank's local micro-batches w, w+k, ... with the cursor of each (for state_dict).
        torch's DataLoader takes from its workers in turn, so the loader sees local micro-batches in order. A batch
        travels as one flat byte tensor: passing one shared-memory tensor instead of four doubles the rate."""
        info = torch.utils.data.get_worker_info()
        w, k = (info.id, info.num_workers) if info else (0, 1)
        cursor = self.advance(self.start, w * self.world_size)
        while True:
            yield torch.from_numpy(np.concatenate([t.numpy().view(np.uint8) for t in self.build(cursor)])), cursor
            cursor = self.advance(cursor, k * self.world_size)

    def unflatten(self, flat: torch.Tensor) -> Batch:
        t, m = 4 * self.tokens, 8 * self.m
        return Batch(flat[:t].view(torch.int32), flat[t:2 * t].view(torch.int32),
                     flat[2 * t:2 * t + m].view(torch.int64), flat[2 * t + m:].view(torch.int64))


class TrainLoader:
    """Rank `rank`'s share of the training stream: its i-th micro-batch is global micro-batch i*world_size + rank.
    An epoch holds every document once, or with sample_by_cluster one member of every cluster (the shards' cluster
    files, from prepare.py --clusters).

    Workers start at the first next(), so load_state_dict before iterating is cheap."""
    iterator = None  # the running torch DataLoader iterator, if any

    def __init__(self, files, tokens_per_rank: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 max_len: int = 1024, mask_rate: float = 0.15, mask_scheme: str = "mask", num_workers: int = 4,
                 pin_memory: bool = False, sample_by_cluster: bool = False):
        check_tokens_per_batch(tokens_per_rank, max_len)
        if not files:
            raise ValueError(f"no training shards given; {PREPARE_HINT}")
        if mask_scheme not in ("mask", "80/10/10"):
            raise ValueError(f"mask_scheme must be 'mask' or '80/10/10', got {mask_scheme!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        if sum(shard_tokens(f) for f in files) == 0:
            raise ValueError(f"the training shards hold no tokens ({files[0]}, ...); {PREPARE_HINT}")
        self.stream = TrainStream(files, tokens_per_rank, world_size, seed, max_len, mask_rate, mask_scheme,
                                  sample_by_cluster)
        self.rank, self.num_workers, self.pin_memory = rank, num_workers, pin_memory
        self.next_cursor = self.stream.advance((0, 0, 0), rank)

    def __next__(self) -> Batch:
        if self.iterator is None:
            self.stream.start = self.cursor()
            self.iterator = iter(torch.utils.data.DataLoader(
                self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                prefetch_factor=4 if self.num_workers else None))
        flat, cursor = next(self.iterator)
        self.last_cursor = cursor
        self.next_cursor = None  # known only when needed: stream.advance(last_cursor, world_size)
        return self.stream.unflatten(flat)

    def __iter__(self):
        return self

    def settings(self) -> dict:
        s = self.stream
        return {"rank": self.rank, "world_size": s.world_size, "seed": s.seed, "tokens_per_rank": s.tokens,
                "max_len": s.max_len, "shards": len(s.files), "sample_by_cluster": s.clusters is not None}

    def cursor(self):
        """The cursor of this rank's next micro-batch."""
        if self.next_cursor is None:
            self.next_cursor = self.stream.advance(self.last_cursor, self.stream.world_size)
        return self.next_cursor

    def state_dict(self) -> dict:
        return {"cursor": self.cursor(), **self.settings()}

    def load_state_dict(self, state: dict) -> None:
        state = {"sample_by_cluster": False, **state}  # states saved before the flag existed did not sample
        saved = {k: state.get(k) for k in self.settings()}
        if saved != self.settings():
            raise ValueError(f"the loader state was saved with {saved}, this loader has {self.settings()}; "
                             "resume with the same data, number of ranks, seed, tokens_per_rank, max_len and "
                             "sampling by cluster")
        self.close()
        self.next_cursor = tuple(state["cursor"])

    def close(self) -> None:
        """Stop the workers now (they restart at the next next()). Dropping torch's iterator alone is not enough:
        after a worker error, the exception's traceback keeps it, and its workers, alive."""
        if self.iterator is not None and self.num_workers:
            self.iterator._shutdown_workers()
        self.iterator = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


# ----------------------------------------------------------------------------------------------------------------
# frozen evaluation

def eval_batches(files, tokens_per_batch: int, scheme: str = "mask", mask_rate: float = 0.15, max_len: int = 1024,
                 seed: int = 0) -> list[Batch]:
    """The whole split as fixed batches, identical on every run and world size.

    Sequence i (counted over the split's shards in order) keeps <cls>, its first max_len-2 residues and <eos>; a
    generator seeded by (seed, i) picks max(1, round(mask_rate * residues)) of its residues and, for 80/10/10, their
    replacements, so the selection is the same under both schemes. Sequences are packed whole, in order."""
    check_tokens_per_batch(tokens_per_batch, max_len)
    if scheme not in ("mask", "80/10/10"):
        raise ValueError(f"scheme must be 'mask' or '80/10/10', got {scheme!r}")
    if not files:
        raise ValueError(f"no evaluation shards given; {PREPARE_HINT}")
    docs = []  # (ids, positions of chosen residues, targets)
    for f in files:
        tokens = read_shard(f)
        starts, lengths = documents(tokens)
        for start, n in zip(starts.tolist(), lengths.tolist()):
            rng = np.random.default_rng([seed, len(docs)])
            residues = min(n - 2, max_len - 2)
            if residues < 1:
                raise ValueError(f"{f}: document {len(docs)} at token {start} has no residues; {PREPARE_HINT}")
            ids = np.empty(residues + 2, dtype=np.uint8)
            ids[0], ids[1:-1], ids[-1] = CLS, tokens[start + 1:start + 1 + residues], EOS
            chosen = 1 + rng.choice(residues, size=max(1, round(mask_rate * residues)), replace=False)
            targets = ids[chosen].astype(np.int64)
            if scheme == "mask":
                ids[chosen] = MASK
            else:
                replace_80_10_10(ids, chosen, rng)
            docs.append((ids, chosen, targets))
    lengths = np.array([len(d[0]) for d in docs])
    bounds = pack(lengths, tokens_per_batch)
    raw = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        offsets = np.cumsum(lengths[a:b]) - lengths[a:b]
        ids, doc_ids = assemble([d[0] for d in docs[a:b]], lengths[a:b], tokens_per_batch)
        mask_idx = np.concatenate([o + d[1] for o, d in zip(offsets, docs[a:b])])
        order = np.argsort(mask_idx)
        raw.append((ids, doc_ids, mask_idx[order], np.concatenate([d[2] for d in docs[a:b]])[order]))
    # mask_idx padded to the batch length: every evaluation set then has one shape, so one compiled graph serves all
    return [to_batch(*r, tokens_per_batch) for r in raw]


def letter_frequency_totals(train_shard, batches: list[Batch], device) -> torch.Tensor:
    """The letter-frequency baseline on evaluation batches: [its cross-entropy summed over their masked tokens, their
    count] (float64, on `device`) when every masked residue is predicted by the token frequencies of one training
    shard's residues. A model must beat it to have learned more than the composition of proteins."""
    counts = torch.from_numpy(np.bincount(read_shard(train_shard), minlength=MASK + 1))
    counts[[CLS, PAD, EOS, MASK]] = 0  # never a masked target: their share would only weaken the baseline
    log_p = (counts.double() / counts.sum()).clamp(min=1e-12).log().to(device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for b in batches:
        targets = b.targets[b.targets != -100]
        totals += torch.stack([-log_p[targets].sum(), torch.tensor(len(targets), device=device)])
    return totals
