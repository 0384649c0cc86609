"""Cluster-balanced sampling: prepare.py --clusters writes a cluster file per training shard, verified like the
shards; TrainLoader(sample_by_cluster=True) makes each epoch one member of every cluster."""
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))
import prepare  # noqa: E402
from dataloader import (CLS, EOS, PAD, VOCAB, TrainLoader, cluster_file, documents, read_shard,  # noqa: E402
                        verified_fingerprint)


def records(fasta: Path) -> list[tuple[str, str]]:
    lines = fasta.read_text().split("\n")
    return [(h[1:], s) for h, s in zip(lines[0::2], lines[1::2]) if h]


def encode(seq: str) -> bytes:
    return bytes([CLS] + [VOCAB.index(c) for c in seq] + [EOS])


def write_tsv(path: Path, rows, seed=0) -> Path:
    """representative<TAB>member lines, in a shuffled order as mmseqs's may be."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    path.write_text("".join(f"{r}\t{m}\n" for r, m in rows))
    return path


def prepare_run(out: Path, fasta: Path, *args) -> dict:
    return prepare.main(["--fasta", str(fasta), "--num_valid", "100", "--num_test", "100", "--shard_tokens", "100000",
                         "--workers", "1", "--out", str(out), "--name", "c", *map(str, args)])


@pytest.fixture(scope="module")
def clustered(small_fasta, tmp_path_factory):
    """The sample's 2,000 records in clusters of sizes 1, 2, ..., 20, 1, 2, ... (the first member represents each),
    prepared with --clusters; and the representative of each document's bytes."""
    tmp = tmp_path_factory.mktemp("clustered")
    recs, rows, representative, k, n = records(small_fasta), [], {}, 0, 0
    while k < len(recs):
        members = recs[k:k + 1 + n % 20]
        rows += [(members[0][0], acc) for acc, _ in members]
        representative.update({encode(seq): members[0][0] for _, seq in members})
        k, n = k + len(members), n + 1
    tsv = write_tsv(tmp / "clusters.tsv", rows)
    manifest = prepare_run(tmp / "out", small_fasta, "--clusters", tsv)
    return tmp / "out", manifest, representative, tsv


def train_files(folder):
    return sorted(Path(folder).glob("*_train_*.bin"))


def shard_documents(files) -> list[bytes]:
    out = []
    for f in files:
        tokens = read_shard(f)
        out += [bytes(tokens[s:s + n]) for s, n in zip(*documents(tokens))]
    return out


def batch_documents(batch) -> list[bytes]:
    """The documents of a micro-batch, unmasked (whole: the loaders here have max_len above every document)."""
    ids = batch.input_ids.clone()
    keep = batch.targets != -100
    ids[batch.mask_idx[keep]] = batch.targets[keep].to(ids.dtype)
    ids, doc_ids = ids.numpy().astype(np.uint8), batch.doc_ids.numpy()
    return [bytes(s) for s in np.split(ids, np.flatnonzero(np.diff(doc_ids)) + 1) if s[0] != PAD]


def epochs(loader, n: int) -> list[list[bytes]]:
    """The documents of the first n epochs of a rank-0, world-size-1 loader."""
    out = [[] for _ in range(n + 1)]
    while True:
        batch = next(loader)
        if loader.last_cursor[0] == n:
            return out[:n]
        out[loader.last_cursor[0]] += batch_documents(batch)


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


LOADER = dict(tokens_per_rank=4096, max_len=2048, num_workers=0, sample_by_cluster=True)


# ---- prepare.py --clusters

def test_prepare_writes_verified_cluster_files_and_keeps_the_shards(clustered, small_fasta, tmp_path):
    out, manifest, representative, _ = clustered
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 5 and all((out / s["clusters"]["file"]).is_file() for s in shards)
    assert sorted(f.name for f in out.glob("*.clusters")) == sorted(cluster_file(s["file"]).name for s in shards)
    # one id per document in shard order; equal ids exactly for one representative; numbered as first met
    docs = shard_documents(train_files(out))
    ids = np.concatenate([np.fromfile(out / s["clusters"]["file"], dtype="<i4") for s in shards])
    assert len(ids) == len(docs) == 1800
    first = {}
    for doc, i in zip(docs, ids.tolist()):
        assert first.setdefault(representative[doc], len(first)) == i
    assert manifest["splits"]["train"]["clusters"] == len(first) == ids.max() + 1
    # the shards, their manifest entries and the fingerprint are those made without --clusters
    plain = prepare_run(tmp_path / "plain", small_fasta)
    assert [{k: s[k] for k in ("file", "tokens", "sha256")} for s in shards] == plain["splits"]["train"]["shards"]
    assert verified_fingerprint(out) == verified_fingerprint(tmp_path / "plain")


def test_cluster_ids_depend_on_the_clustering_only(clustered, small_fasta, tmp_path):
    """Another line order of the TSV (mmseqs's is thread-dependent), 2 workers and UniProt-style ids give the same
    cluster files."""
    out, manifest, _, tsv = clustered
    rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    uniprot = {acc: f"sp|{acc}|NAME_{k}" for k, (_, acc) in enumerate(rows)}
    fasta = tmp_path / "uniprot.fasta"
    fasta.write_text("".join(f">{uniprot[acc]} a description\n{seq}\n" for acc, seq in records(small_fasta)))
    shuffled = write_tsv(tmp_path / "shuffled.tsv", [(uniprot[r], uniprot[m]) for r, m in rows], seed=1)
    again = prepare_run(tmp_path / "again", fasta, "--clusters", shuffled, "--workers", 2)
    assert again["splits"]["train"] == manifest["splits"]["train"]


def test_a_training_record_missing_from_the_tsv_is_refused(clustered, small_fasta, tmp_path):
    _, manifest, _, tsv = clustered
    lines = tsv.read_text().splitlines()
    recs = records(small_fasta)
    held = {recs[k][0] for k in prepare.held_out(len(recs), 100, 100, 0, "")}  # the valid and test records
    gone = next(line for line in lines if line.split("\t")[1] not in held)
    (tmp_path / "short.tsv").write_text("\n".join(line for line in lines if line != gone) + "\n")
    with pytest.raises(ValueError, match=f"training record\\(s\\) {gone.split()[1]} are no member in --clusters"):
        prepare_run(tmp_path / "out", small_fasta, "--clusters", tmp_path / "short.tsv")
    assert sorted(tmp_path.iterdir()) == [tmp_path / "short.tsv"]  # no --out, no temporary folder left
    # a held-out record needs no cluster
    kept = next(line for line in lines if line.split("\t")[1] in held)
    (tmp_path / "held.tsv").write_text("\n".join(line for line in lines if line != kept) + "\n")
    again = prepare_run(tmp_path / "ok", small_fasta, "--clusters", tmp_path / "held.tsv")
    assert again["splits"]["train"] == manifest["splits"]["train"]


@pytest.mark.parametrize("text, message", [("A\tB\tC\n", r"clusters\.tsv:1: expected representative<TAB>member"),
                                           ("A\tB\nC\tB\n", r"clusters\.tsv:2: B is a member of two clusters")])
def test_a_bad_tsv_names_its_line(small_fasta, tmp_path, text, message):
    (tmp_path / "clusters.tsv").write_text(text)
    with pytest.raises(ValueError, match=message):
        prepare_run(tmp_path / "out", small_fasta, "--clusters", tmp_path / "clusters.tsv")


def test_verified_fingerprint_refuses_a_changed_missing_or_unlisted_cluster_file(clustered, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(clustered[0], folder)
    name = "c_train_000002.clusters"
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match=f"cluster file\\(s\\) {name} changed since they were made"):
        verified_fingerprint(folder)
    (folder / name).unlink()
    with pytest.raises(ValueError, match=f"cluster file\\(s\\) {name} listed in its manifest.json but missing"):
        verified_fingerprint(folder)
    (folder / name).write_bytes(data)
    verified_fingerprint(folder)
    (folder / "c_train_000099.clusters").write_bytes(data)
    with pytest.raises(ValueError, match="cluster file\\(s\\) c_train_000099.clusters not listed"):
        verified_fingerprint(folder)


# ---- TrainLoader(sample_by_cluster=True)

def test_an_epoch_is_one_member_of_every_cluster(clustered):
    out, manifest, representative, _ = clustered
    files = train_files(out)
    with TrainLoader(files, **LOADER) as loader:
        picks = epochs(loader, 3)
    with TrainLoader(files, seed=1, **LOADER) as loader:
        other_seed = epochs(loader, 1)[0]
    clusters = manifest["splits"]["train"]["clusters"]
    for epoch in picks + [other_seed]:
        assert len(epoch) == clusters == len({representative[d] for d in epoch})
    assert len({frozenset(e) for e in picks + [other_seed]}) == 4  # other picks in every epoch and seed
    assert len(set().union(*picks)) > 2 * clusters  # members of all sizes come up, not the same few


def test_sampled_stream_is_the_same_on_any_world_size_and_resumes_exactly(clustered):
    files = train_files(clustered[0])
    with TrainLoader(files, **LOADER) as one:
        stream = [next(one) for _ in range(40)]  # about 2 epochs
    assert one.last_cursor[0] >= 1
    for world in (2, 3):
        for rank in range(world):
            with TrainLoader(files, rank=rank, world_size=world, **{**LOADER, "num_workers": 1}) as loader:
                assert all(same(x, y) for x, y in zip(stream[rank::world], [next(loader) for _ in stream[rank::world]]))
    with TrainLoader(files, **{**LOADER, "num_workers": 2}) as a:
        for _ in range(7):
            next(a)
        state = a.state_dict()
        assert state["sample_by_cluster"] is True
        expected = [next(a) for _ in range(9)]
    assert all(same(x, y) for x, y in zip(expected, stream[7:16]))
    with TrainLoader(files, **LOADER) as b:
        b.load_state_dict(state)
        assert all(same(x, y) for x, y in zip(expected, [next(b) for _ in range(9)]))
    with pytest.raises(ValueError, match="sampling by cluster"):
        TrainLoader(files, 4096, max_len=2048).load_state_dict(state)


def test_without_sampling_the_cluster_files_change_nothing(clustered, tmp_path):
    out = clustered[0]
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in train_files(out):  # the same shards, no cluster files
        (plain / f.name).write_bytes(f.read_bytes())
    with TrainLoader(train_files(out), 4096, max_len=256, num_workers=0) as a, \
            TrainLoader(train_files(plain), 4096, max_len=256, num_workers=0) as b:
        assert all(same(next(a), next(b)) for _ in range(200))  # past the first epoch
        state = a.state_dict()
    assert state["sample_by_cluster"] is False
    del state["sample_by_cluster"]  # a state saved before the flag existed resumes
    TrainLoader(train_files(out), 4096, max_len=256).load_state_dict(state)
    with pytest.raises(ValueError, match=r"c_train_000000.bin has no cluster file c_train_000000.clusters"):
        TrainLoader(train_files(plain), **LOADER)
    (plain / "c_train_000000.clusters").write_bytes(b"\0" * 12)
    with pytest.raises(ValueError, match=r"c_train_000000.clusters holds 12 bytes, not 4 for each of the"):
        TrainLoader(train_files(plain), **LOADER)


def test_a_run_sampling_by_cluster_names_its_cluster_files(clustered, tmp_path):
    """They are outside the data fingerprint: the run record names them, and tools.records check holds every run of
    an attempt to the same ones."""
    import train
    from test_train import records, tiny
    out, manifest, _, _ = clustered
    train.main(tiny(out, tmp_path, max_steps=2, val_every=2, sample_by_cluster=True))
    expected = [s["clusters"]["sha256"] for s in manifest["splits"]["train"]["shards"]]
    assert next(r for r in records(tmp_path / "logs") if r.get("kind") == "run")["clusters_sha256"] == expected
    (log,) = (tmp_path / "logs").glob("*.txt")
    assert f"\nclusters sha256: {' '.join(expected)}\n" in log.read_text()


def test_sampling_by_cluster_on_shards_made_without_clusters_says_how_to_make_them(small_shards, tmp_path):
    import train
    from test_train import tiny
    h = tiny(small_shards, tmp_path, sample_by_cluster=True)
    with pytest.raises(train.RunError, match="made without them; remake it with data/prepare.py --clusters TSV"):
        train.main(h)
    assert not Path(h.log_dir).exists()  # refused before any log was opened
