import gzip
import hashlib
import json
import lzma
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))
import prepare  # noqa: E402
from dataloader import (CLS, EOS, MASK, PAD, UNK, VOCAB, Batch, TrainLoader, assemble,  # noqa: E402
                        block_aligned_order, documents, eval_batches, letter_frequency_totals, read_shard, write_shard)
from model import block_mask, positions  # noqa: E402


def shards(folder, split):
    return sorted(Path(folder).glob(f"*_{split}_*.bin"))


def docs_of(files) -> list[bytes]:
    out = []
    for f in files:
        tokens = read_shard(f)
        starts, lengths = documents(tokens)
        out += [bytes(tokens[s:s + n]) for s, n in zip(starts, lengths)]
    return out


def encode(seq: str) -> bytes:
    return bytes([CLS] + [VOCAB.index(c) for c in seq] + [EOS])


def run_prepare(tmp_path, *args):
    out = tmp_path / "out"
    return prepare.main(["--workers", "1", *map(str, args), "--out", str(out), "--name", "t"]), out


def sha256s(manifest):
    return {s: [f["sha256"] for f in v["shards"]] for s, v in manifest["splits"].items()}


# ---- shard format

def test_shard_round_trip(tmp_path):
    tokens = np.array([CLS, 4, 5, 6, EOS, CLS, 7, EOS], dtype=np.uint8)
    sha = write_shard(tmp_path / "x_train_000000.bin", tokens)
    assert np.array_equal(read_shard(tmp_path / "x_train_000000.bin"), tokens)
    assert sha == hashlib.sha256((tmp_path / "x_train_000000.bin").read_bytes()).hexdigest()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"\x00" * 4 + b[4:], "not a token shard"),
    (lambda b: b[:4] + (2).to_bytes(4, "little") + b[8:], "version 2"),
    (lambda b: b[:-1], "truncated"),
    (lambda b: b[:100], "not a token shard"),
])
def test_bad_shards_name_the_file(tmp_path, damage, message):
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, np.array([CLS, 4, EOS], dtype=np.uint8))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as e:
        read_shard(path)
    assert str(path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        read_shard(tmp_path / "missing.bin")


# ---- prepare.py

def test_fasta_edge_cases(tmp_path):
    text = ">a desc\nMKV\nlla\r\n>b\nAC*J\n\n>c\nW\n"
    (tmp_path / "in.fasta").write_text(text)
    (tmp_path / "in.fasta.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "in.fasta.xz").write_bytes(lzma.compress(text.encode()))
    for name in ("in.fasta", "in.fasta.gz", "in.fasta.xz"):
        f = tmp_path / name
        manifest, out = run_prepare(tmp_path / name.replace(".", "_"), "--train", f, "--valid", f, "--test", f)
        expected = [encode("MKVLLA"), encode("AC")[:-1] + bytes([UNK, UNK, EOS]), encode("W")]
        assert docs_of(shards(out, "train")) == expected
        assert manifest["unknown_characters"] == 3 * 2
        assert manifest["splits"]["valid"]["sequences"] == 3
    (tmp_path / "cut.fasta.xz").write_bytes(lzma.compress(text.encode())[:-8])
    with pytest.raises(ValueError, match=f"{tmp_path / 'cut.fasta.xz'}: cannot read it"):
        run_prepare(tmp_path / "cut", "--fasta", tmp_path / "cut.fasta.xz", "--num_valid", 0, "--num_test", 0)


@pytest.mark.parametrize("text, where, message", [
    (">a\nMK\n>b\n\n>c\nA\n", ":3:", "no residues"),
    (">a\nMK\n>b", ":3:", "no residues"),
    ("MKV\n>a\nA\n", ":1:", "not a FASTA file"),
    ("\n\nhello\n", ":3:", "not a FASTA file"),
    ("", "", "empty file"),
])
def test_bad_fasta_names_file_and_line(tmp_path, text, where, message):
    f = tmp_path / "bad.fasta"
    f.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        run_prepare(tmp_path, "--fasta", f, "--num_valid", "0", "--num_test", "0")
    assert f"{f}{where}" in str(e.value)


def test_split_is_seeded_disjoint_and_complete(small_fasta, small_shards, tmp_path):
    manifest = json.loads((small_shards / "manifest.json").read_text())
    assert [manifest["splits"][s]["sequences"] for s in ("train", "valid", "test")] == [1950, 25, 25]
    split = {s: docs_of(shards(small_shards, s)) for s in ("train", "valid", "test")}
    lines = small_fasta.read_text().split("\n")
    everything = sorted(encode(s) for s in lines[1::2] if s)
    assert sorted(split["train"] + split["valid"] + split["test"]) == everything
    assert not set(split["valid"]) & set(split["train"]) and not set(split["test"]) & set(split["train"])
    # the same seed gives the same shards (also from 2 processes); another seed another split
    again, out = run_prepare(tmp_path / "a", "--fasta", small_fasta, "--num_valid", 25, "--num_test", 25,
                             "--workers", 2)
    assert sha256s(again) == sha256s(manifest)
    other, _ = run_prepare(tmp_path / "b", "--fasta", small_fasta, "--num_valid", 25, "--num_test", 25,
                           "--seed", 1)
    assert other["splits"]["valid"]["shards"][0]["sha256"] != manifest["splits"]["valid"]["shards"][0]["sha256"]


def test_shards_hold_whole_documents(small_fasta, tmp_path):
    manifest, out = run_prepare(tmp_path, "--fasta", small_fasta, "--num_valid", 10, "--num_test", 10,
                                "--shard_tokens", 100_000)
    train = shards(out, "train")
    assert len(train) == len(manifest["splits"]["train"]["shards"]) > 5
    for f in train:
        tokens = read_shard(f)
        assert tokens[0] == CLS and tokens[-1] == EOS and len(tokens) <= 100_000
    assert len(docs_of(train)) == 1980


def test_hf_dataset_splits_like_fasta(tmp_path):
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), size=rng.integers(5, 60))) for _ in range(300)]
    hf = tmp_path / "hf"
    hf.mkdir()
    rows = [json.dumps({"id": str(i), "sequence": s}) + "\n" for i, s in enumerate(seqs)]
    (hf / "train.jsonl").write_text("".join(rows))
    (tmp_path / "in.fasta").write_text("".join(f">{i}\n{s}\n" for i, s in enumerate(seqs)))
    args = ("--num_valid", 20, "--num_test", 30, "--seed", 3)
    from_hf, _ = run_prepare(tmp_path / "1", "--hf_dataset", hf, *args)
    from_fasta, _ = run_prepare(tmp_path / "2", "--fasta", tmp_path / "in.fasta", *args)
    assert from_hf["splits"] == from_fasta["splits"]
    # a dataset with its own splits is used as it is
    split = tmp_path / "split"
    split.mkdir()
    for name, rows in (("train", seqs[:200]), ("validation", seqs[200:250]), ("test", seqs[250:])):
        (split / f"{name}.jsonl").write_text("".join(json.dumps({"sequence": s}) + "\n" for s in rows))
    manifest, out = run_prepare(tmp_path / "3", "--hf_dataset", split)
    assert docs_of(shards(out, "valid")) == [encode(s) for s in seqs[200:250]]


def folder_bytes(folder: Path) -> dict:
    return {f.name: f.read_bytes() for f in folder.iterdir()}


def test_failed_prepare_leaves_out_as_it_was(small_fasta, tmp_path, capsys):
    valid, bad = tmp_path / "valid.fasta", tmp_path / "test.fasta"
    valid.write_text(">v\nMKVLA\n")
    bad.write_text(">t\nMKV\n>empty\n")  # a record with no residues at the end of the last input
    out = tmp_path / "data" / "out"

    def run(test, out=out):
        return prepare.main(list(map(str, ["--workers", 2, "--train", small_fasta, "--valid", valid, "--test", test,
                                           "--shard_tokens", 100_000, "--out", out, "--name", "t"])))

    run(valid)
    assert f"wrote {out}" in capsys.readouterr().out  # where the shards are
    before, siblings = folder_bytes(out), sorted(out.parent.iterdir())
    assert len(before) == 7 + 1 + 1 + 1
    with pytest.raises(ValueError, match="no residues"):
        run(bad)
    assert folder_bytes(out) == before and sorted(out.parent.iterdir()) == siblings  # no temporary folder left
    with pytest.raises(ValueError, match="no residues"):  # a new --out is not made at all
        run(bad, tmp_path / "data" / "new")
    assert sorted(out.parent.iterdir()) == siblings


def test_prepare_replaces_out_whole_and_keeps_other_files(small_fasta, tmp_path):
    many, out = run_prepare(tmp_path, "--fasta", small_fasta, "--num_valid", 10, "--num_test", 10,
                            "--shard_tokens", 100_000)
    assert len(many["splits"]["train"]["shards"]) == 7
    one, _ = run_prepare(tmp_path, "--fasta", small_fasta, "--num_valid", 10, "--num_test", 10)
    assert sorted(f.name for f in out.iterdir()) == ["manifest.json", "t_test_000000.bin", "t_train_000000.bin",
                                                     "t_valid_000000.bin"]  # no shard of the earlier run survives
    assert json.loads((out / "manifest.json").read_text()) == one
    assert sha256s(one) == {s: [hashlib.sha256(f.read_bytes()).hexdigest()] for s in ("train", "valid", "test")
                            for f in shards(out, s)}
    # an --out holding anything else is refused before any work, and left as it was
    (out / "notes.txt").write_text("mine")
    before = folder_bytes(out)
    with pytest.raises(ValueError, match=r"notes\.txt.*replaces the whole folder"):
        run_prepare(tmp_path, "--fasta", small_fasta, "--num_valid", 10, "--num_test", 10)
    assert folder_bytes(out) == before and sorted(tmp_path.iterdir()) == [out]


# ---- training loader

def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def originals(b):
    ids = b.input_ids.clone()
    keep = b.targets != -100
    ids[b.mask_idx[keep]] = b.targets[keep].to(ids.dtype)
    return ids


@pytest.mark.parametrize("scheme", ["mask", "80/10/10"])
def test_masking_rates_and_specials(small_shards, scheme):
    with TrainLoader(shards(small_shards, "train"), 8192, max_len=1024, mask_scheme=scheme, num_workers=0) as loader:
        batches = take(loader, 20)
    chosen = replaced = randomised = 0
    for b in batches:
        assert b.input_ids.dtype == b.doc_ids.dtype == torch.int32 and b.mask_idx.dtype == torch.int64
        assert len(b.input_ids) == 8192 and len(b.mask_idx) == 1229  # ceil(0.15 * 8192)
        keep = b.targets != -100
        ids = originals(b)
        maskable = int(((ids >= UNK) & (ids < MASK)).sum())
        assert int(keep.sum()) == round(0.15 * maskable)
        assert not torch.isin(b.targets[keep], torch.tensor([CLS, PAD, EOS, MASK])).any()
        assert (b.mask_idx[~keep] == 0).all()
        new = b.input_ids[b.mask_idx[keep]]
        chosen += int(keep.sum())
        replaced += int((new == MASK).sum())
        randomised += int(((new != MASK) & (new != b.targets[keep].to(new.dtype))).sum())
        # everything not chosen is unchanged
        untouched = torch.ones(8192, dtype=torch.bool)
        untouched[b.mask_idx[keep]] = False
        assert torch.equal(b.input_ids[untouched], ids[untouched])
    if scheme == "mask":
        assert replaced == chosen
    else:
        assert abs(replaced / chosen - 0.8) < 0.002
        assert 0.09 < randomised / chosen < 0.1  # 10% random, of which ~1/20 hit the original


def test_documents_never_straddle_unmarked(small_shards):
    files = shards(small_shards, "train")
    whole = docs_of(files)
    text = b"".join(whole)
    for max_len in (256, 2048):
        with TrainLoader(files, 4096, max_len=max_len, num_workers=0) as loader:
            pieces = []
            for b in take(loader, 200):
                ids, doc_ids = originals(b).numpy().astype(np.uint8), b.doc_ids.numpy()
                assert (np.diff(doc_ids) >= 0).all()
                segments = np.split(ids, np.flatnonzero(np.diff(doc_ids)) + 1)
                while segments[-1][0] == PAD:  # the padding tail: one <pad> per document
                    assert len(segments.pop()) == 1
                for s in segments:
                    assert 0 < len(s) <= max_len and PAD not in s
                    assert CLS not in s[1:] and EOS not in s[:-1]  # a piece is whole only if it has both ends
                    assert bytes(s) in text
                    pieces.append(bytes(s))
        if max_len == 2048:  # no crops: one epoch is every training document exactly once
            epoch = len(whole)
            assert sorted(pieces[:epoch]) == sorted(whole)
        else:
            assert max(map(len, pieces)) == 256
            assert any(p[0] != CLS for p in pieces) and any(p[-1] != EOS for p in pieces)


def test_block_aligned_order_keeps_each_buffers_documents_and_cuts_attention_work(small_shards):
    """Each buffer holds the documents the greedy packing gave it, reordered so that FlexAttention computes fewer
    128 x 128 block pairs (on sp2014 at 65,536 tokens: 16% fewer, and nearly half fewer partially masked ones)."""
    def work(doc_ids):  # block pairs computed: [all, partially masked]
        mask = block_mask(torch.as_tensor(doc_ids), torch.tensor(1024))
        partial, full = int(mask.kv_num_blocks.sum()), int(mask.full_kv_num_blocks.sum())
        return np.array([partial + full, partial])

    packed_work = aligned_work = 0
    with TrainLoader(shards(small_shards, "train"), 16384, num_workers=0) as loader:
        stream = loader.stream
        shard, start, length, bounds = stream.group_plan(0, 0)
        for b in range(len(bounds) - 1):
            docs = slice(bounds[b], bounds[b + 1])
            packed = [stream.shard(s)[i:i + n] for s, i, n in zip(shard[docs], start[docs], length[docs])]
            order = block_aligned_order(length[docs])
            assert sorted(order.tolist()) == list(range(len(packed)))
            built = stream.build((0, 0, b))
            assert bytes(originals(built).numpy().astype(np.uint8)[:length[docs].sum()]) == \
                b"".join(bytes(packed[i]) for i in order)
            packed_work = packed_work + work(assemble(packed, length[docs], 16384)[1])
            aligned_work = aligned_work + work(built.doc_ids)
    assert aligned_work[0] < 0.9 * packed_work[0], (aligned_work, packed_work)
    assert aligned_work[1] < 0.7 * packed_work[1], (aligned_work, packed_work)


def test_resume_gives_the_same_batches(small_shards):
    files = shards(small_shards, "train")
    with TrainLoader(files, 4096, seed=5, num_workers=2, mask_scheme="80/10/10") as a:
        take(a, 7)
        state = a.state_dict()
        expected = take(a, 9)
        a.load_state_dict(state)  # also while its workers run
        assert all(same(x, y) for x, y in zip(expected, take(a, 4)))
        a.close()  # stopped workers restart where the stream stopped
        assert all(same(x, y) for x, y in zip(expected[4:], take(a, 5)))
    with TrainLoader(files, 4096, seed=5, num_workers=1, mask_scheme="80/10/10") as b:
        b.load_state_dict(state)
        assert all(same(x, y) for x, y in zip(expected, take(b, 9)))
    with pytest.raises(ValueError, match="same data, number of ranks"):
        TrainLoader(files, 4096, seed=5, rank=1, world_size=2).load_state_dict(state)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_ranks_and_workers_share_one_global_stream(small_shards):
    files = shards(small_shards, "train")
    # 250 micro-batches: more than one epoch (1,800 documents, ~150 batches of 4,096 tokens)
    with TrainLoader(files, 4096, num_workers=0) as one:
        stream = take(one, 250)
    with TrainLoader(files, 4096, num_workers=3) as three:
        assert all(same(x, y) for x, y in zip(stream, take(three, 250)))
    for world in (2, 3):
        for rank in range(world):
            with TrainLoader(files, 4096, rank=rank, world_size=world, num_workers=1) as loader:
                assert all(same(x, y) for x, y in zip(stream[rank::world], take(loader, len(stream[rank::world]))))
    with TrainLoader(files, 4096, seed=1, num_workers=0) as other:
        assert not same(stream[0], next(other))


def test_bad_loader_arguments(small_shards):
    files = shards(small_shards, "train")
    for tokens, max_len in ((1000, 512), (512, 1024), (0, 128)):
        with pytest.raises(ValueError, match="multiple of 128"):
            TrainLoader(files, tokens, max_len=max_len)
    with pytest.raises(ValueError, match="prepare.py"):
        TrainLoader([], 4096)


# ---- frozen evaluation

def per_sequence_masks(batches):
    """(sequence tokens, masked positions within it, targets) for every sequence, from packed batches."""
    out = []
    for b in batches:
        ids, doc_ids = b.input_ids.numpy(), b.doc_ids.numpy()
        keep = (b.targets != -100).numpy()
        idx, tgt = b.mask_idx.numpy()[keep], b.targets.numpy()[keep]
        for d in np.unique(doc_ids):
            where = np.flatnonzero(doc_ids == d)
            if ids[where[0]] == PAD:
                continue
            mine = (idx >= where[0]) & (idx <= where[-1])
            out.append((ids[where].tobytes(), (idx[mine] - where[0]).tolist(), tgt[mine].tolist()))
    return out


def test_positions_stay_inside_max_len_also_in_padding(small_shards):
    """The model's rotary tables cover positions < max_len: documents are cropped to it and a long <pad> tail (the
    last evaluation batch is mostly padding) must not count up past it."""
    batches = eval_batches(shards(small_shards, "valid"), 8192, max_len=256)
    with TrainLoader(shards(small_shards, "train"), 8192, max_len=256, num_workers=0) as loader:
        batches += take(loader, 20)
    assert (batches[-21].input_ids == PAD).sum() > 256  # the last evaluation batch has a long tail
    assert all(int(positions(b.doc_ids).max()) < 256 for b in batches)


def test_eval_masks_are_frozen(small_shards):
    files = shards(small_shards, "valid")
    a = eval_batches(files, 4096, max_len=256)
    assert all(len(b.input_ids) == 4096 and len(b.mask_idx) == len(a[0].mask_idx) for b in a)
    assert all(same(x, y) for x, y in zip(a, eval_batches(files, 4096, max_len=256)))
    seqs = per_sequence_masks(a)
    assert len(seqs) == 25
    # the same masks for any batch size, so for any world size taking batches [rank::world]
    assert per_sequence_masks(eval_batches(files, 8192, max_len=256)) == seqs
    whole = docs_of(files)
    residues = 0
    for (ids, pos, tgt), doc in zip(seqs, whole):
        ids = np.frombuffer(ids, dtype=np.int32)
        n = min(len(doc) - 2, 254)
        residues += n
        assert len(ids) == n + 2 and ids[0] == CLS and ids[-1] == EOS
        assert len(pos) == max(1, round(0.15 * n)) and all(1 <= p <= n for p in pos)
        assert tgt == [doc[p] for p in pos]
        assert all(ids[p] == MASK for p in pos)
    # 80/10/10 picks the same positions
    mixed = per_sequence_masks(eval_batches(files, 4096, scheme="80/10/10", max_len=256))
    assert [(p, t) for _, p, t in mixed] == [(p, t) for _, p, t in seqs]


def test_the_letter_frequency_baseline_predicts_by_residue_counts(tmp_path):
    """By hand: a training shard of residues A, A, L (and the specials, which are never predicted) makes
    p(A) = 2/3 and p(L) = 1/3; masked targets A and L then cost -log(2/3) - log(1/3) over 2 tokens."""
    A, L = VOCAB.index("A"), VOCAB.index("L")
    shard = tmp_path / "t_train_000000.bin"
    write_shard(shard, np.array([CLS, A, A, L, EOS], dtype=np.uint8))
    batch = Batch(torch.zeros(8, dtype=torch.int32), torch.zeros(8, dtype=torch.int32), torch.tensor([1, 2, 0]),
                  torch.tensor([A, L, -100]))  # the last slot is padding
    loss_sum, count = letter_frequency_totals(shard, [batch, batch], "cpu").tolist()
    assert count == 4 and loss_sum == pytest.approx(-2 * (math.log(2 / 3) + math.log(1 / 3)))
