"""tools/hf.py: a real tiny checkpoint exported as a Hugging Face folder, and scoring with the frozen metric and with
the published evaluator's protocol (--protocol reference)."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import train
from data.prepare import encode
from dataloader import CLS, EOS, MASK, PAD, VOCAB, assemble, documents, eval_batches, read_shard
from model import PRESETS, Model
from test_train import REPO, tiny
from train import SCHEMES, metric_key
from tools.hf import (HFError, data_fingerprint, document_lengths, export, reference_batches, save_tokenizer, score,
                      split_documents)


def run_hf(*args):
    return subprocess.run([sys.executable, "-m", "tools.hf", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def checkpoint(small_shards, tmp_path_factory) -> Path:
    """A tiny model with random weights (the LM head too, which training starts at zero) saved as train.py saves
    a checkpoint, with the hyperparameters of a tiny run on small_shards."""
    h = tiny(small_shards, tmp_path_factory.mktemp("run"))
    torch.manual_seed(0)
    model = Model(dataclasses.replace(PRESETS[h.preset], max_len=h.max_len))
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    path = Path(h.checkpoint_dir) / "step_000000.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "hyperparameters": dataclasses.asdict(h), "step": 0, "run_id": "test",
                "data_sha256": data_fingerprint(Path(h.data))}, path)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "plmrun-tiny"
    r = run_hf("export", str(checkpoint), "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def esm_dir(tmp_path_factory) -> Path:
    """A small random ESM-2 (rotary positions, token dropout, ESM-2's vocabulary and special tokens)."""
    config = transformers.EsmConfig(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=1026, position_embedding_type="rotary",
                                    token_dropout=True, emb_layer_norm_before=False, pad_token_id=1, mask_token_id=32,
                                    initializer_range=0.3)  # far from uniform predictions, so the test has teeth
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("esm")
    transformers.EsmForMaskedLM(config).save_pretrained(out)
    save_tokenizer(out, 1024)
    return out


def fasta_sequences(path, n) -> list[str]:
    records = path.read_text().split(">")[1:n + 1]
    return ["".join(r.splitlines()[1:]) for r in records]


def test_the_tokenizer_encodes_like_prepare(exported, small_fasta):
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    seqs = fasta_sequences(small_fasta, 50) + ["MKXBUZOJ"]  # rare letters, and J: <unk> in both
    fasta = "".join(f">s{i}\n{s}\n" for i, s in enumerate(seqs)).encode()
    tokens, lengths, _ = encode(("test", 1, 0, fasta, "valid"))[0]["valid"]
    expected = np.split(np.frombuffer(tokens, dtype=np.uint8), np.cumsum(lengths)[:-1])
    assert [tokenizer(s)["input_ids"] for s in seqs] == [e.tolist() for e in expected]


def test_the_exported_folder_loads_with_the_auto_classes_and_gives_our_logits(checkpoint, exported, small_fasta):
    ckpt = torch.load(checkpoint, weights_only=False)
    ours = Model(dataclasses.replace(PRESETS["tiny"], max_len=512))
    ours.load_state_dict(ckpt["model"])
    assert transformers.AutoConfig.from_pretrained(exported, trust_remote_code=True).model_type == "plmrun"
    hf = transformers.AutoModelForMaskedLM.from_pretrained(exported, trust_remote_code=True)
    assert all(torch.equal(hf.model.state_dict()[k], v) for k, v in ckpt["model"].items())
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    seqs = [s[:300] for s in fasta_sequences(small_fasta, 5)]
    seqs[1] = seqs[1][:20].replace("L", "<mask>")
    enc = tokenizer(seqs, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = hf(**enc).logits
        for row, keep in zip(range(len(seqs)), enc["attention_mask"].bool()):
            ids = enc["input_ids"][row][keep].numpy()
            buffer, doc_ids = assemble([ids], np.array([len(ids)]), 384)
            alone = ours(torch.from_numpy(buffer), torch.from_numpy(doc_ids), torch.arange(len(ids)), None,
                         torch.tensor(512))
            torch.testing.assert_close(logits[row][keep], alone, atol=1e-5, rtol=0)
            assert (logits[row][~keep] == 0).all()


def test_scoring_the_exported_folder_gives_train_eval_only_exactly(checkpoint, exported, small_shards, tmp_path):
    out = tmp_path / "scores.json"
    r = run_hf("score", str(exported), "--data", str(small_shards), "--max_len", "512", "--tokens_per_batch", "1024",
               "--splits", "valid", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "valid 80/10/10: loss " in r.stdout
    scores = json.loads(out.read_text())
    reference = train.main(tiny(small_shards, tmp_path, eval_only=True, resume=str(checkpoint)))
    valid = [k for k in reference if k.startswith("valid")]
    assert len(valid) == 4 and all(scores[k] == reference[k] for k in valid), (scores, reference)


def test_a_model_shorter_than_the_frozen_crop_is_refused_with_the_flag_to_pass(exported, small_shards):
    r = run_hf("score", str(exported), "--data", str(small_shards))  # exported with max_len 512; the crop is 1024
    assert r.returncode == 1 and "pass --max_len 512" in r.stderr and "Traceback" not in r.stderr


def assert_scores_are_per_document(scores, shards: Path, run_document):
    """The valid scores equal cross-entropy and accuracy with each document run alone:
    run_document(its token ids, its masked positions, their targets) -> (logits, targets in the model's ids)."""
    for scheme in SCHEMES:
        loss_sum, correct, count = 0.0, 0, 0
        for b in eval_batches(sorted(shards.glob("*_valid_*.bin")), 4096, scheme):
            for doc in b.doc_ids[b.input_ids != PAD].unique():
                where = torch.nonzero(b.doc_ids == doc)[:, 0]
                rows = torch.isin(b.mask_idx, where) & (b.targets != -100)
                with torch.no_grad():
                    logits, targets = run_document(b.input_ids[where], b.mask_idx[rows] - where[0], b.targets[rows])
                loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
                correct += (logits.argmax(-1) == targets).sum().item()
                count += len(targets)
        key = metric_key("valid", scheme)
        assert scores[f"{key}_tokens"] == count
        assert scores[f"{key}_loss"] == pytest.approx(loss_sum / count, rel=1e-6)
        assert scores[f"{key}_accuracy"] == pytest.approx(correct / count, abs=1e-3)


def test_scoring_an_esm_model_equals_running_each_sequence_alone(esm_dir, small_shards):
    scores = score(esm_dir, small_shards, splits=["valid"], tokens_per_batch=4096)
    esm = transformers.EsmForMaskedLM.from_pretrained(esm_dir).eval()
    assert_scores_are_per_document(scores, small_shards,
                                   lambda ids, at, targets: (esm(input_ids=ids[None].long()).logits[0][at], targets))


def remap_vocabulary(esm_dir: Path, tokens: list[str], out: Path, **special) -> Path:
    """The ESM model of esm_dir with the vocabulary `tokens`: rows of ours where the token is ours (<bos> takes
    <cls>'s), random rows (a real share of the probability) for the others."""
    ours = [VOCAB.index("<cls>" if t == "<bos>" else t) if t in VOCAB or t == "<bos>" else None for t in tokens]
    esm = transformers.EsmForMaskedLM.from_pretrained(esm_dir)
    state = esm.state_dict()
    torch.manual_seed(1)
    for name in ("esm.embeddings.word_embeddings.weight", "lm_head.decoder.weight", "lm_head.bias"):
        state[name] = torch.stack([state[name][i] if i is not None else torch.randn_like(state[name][0])
                                   for i in ours])
    config = esm.config.to_dict() | {"vocab_size": len(tokens), "pad_token_id": tokens.index("<pad>"),
                                     "mask_token_id": tokens.index("<mask>")}
    other = transformers.EsmForMaskedLM(transformers.EsmConfig(**config))
    other.load_state_dict(state)
    other.save_pretrained(out)
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n")
    transformers.EsmTokenizer(str(out / "vocab.txt"), cls_token="<bos>", **special).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def other_vocab_dir(esm_dir, tmp_path_factory) -> Path:
    """An AMPLIFY-like vocabulary: another order, <bos> for <cls>, a "|" token we do not have, none of ESM-2's
    ".", "-" and <null_1>, and "X" as its unknown token (so one token of theirs stands for two of ours)."""
    tokens = ["<pad>", "<mask>", "<bos>", "<eos>", "|", *VOCAB[4:29][::-1]]
    return remap_vocabulary(esm_dir, tokens, tmp_path_factory.mktemp("other"), unk_token="X")


def test_a_model_with_another_vocabulary_is_scored_through_its_own_tokenizer(other_vocab_dir, small_shards):
    """The reference spells each frozen document out in letters, encodes it with the model's own tokenizer and takes
    cross-entropy and argmax over the model's whole vocabulary."""
    scores = score(other_vocab_dir, small_shards, splits=["valid"], tokens_per_batch=4096)
    tokenizer = transformers.AutoTokenizer.from_pretrained(other_vocab_dir)
    model = transformers.EsmForMaskedLM.from_pretrained(other_vocab_dir).eval()

    def run_document(ids, at, targets):
        residues = "".join(VOCAB[i] for i in ids[1:-1])  # between <cls> and <eos>
        theirs = tokenizer(residues, return_tensors="pt")["input_ids"]
        assert theirs.shape[1] == len(ids)
        return model(theirs).logits[0][at], torch.tensor(tokenizer.convert_tokens_to_ids([VOCAB[t] for t in targets]))

    assert_scores_are_per_document(scores, small_shards, run_document)


def test_a_vocabulary_without_the_amino_acids_is_refused(esm_dir, small_shards, tmp_path):
    tokens = ["<pad>", "<unk>", "<mask>", "<bos>", "<eos>", *"ACDEFGHIKL"]
    other = remap_vocabulary(esm_dir, tokens, tmp_path / "other")
    with pytest.raises(HFError, match="has no token for V S R T P Q N Y M W;"):
        score(other, small_shards)


def test_a_model_lacking_a_masked_residue_is_refused(esm_dir, tmp_path):
    """Rare letters need no token of their own, but a frozen set that masks one the model lacks cannot be scored."""
    fasta = tmp_path / "x.fasta"
    fasta.write_text("".join(f">s{i}\n{'MKXXLAXXGVXX' * 10}\n" for i in range(30)))
    data = tmp_path / "shards"
    subprocess.run([sys.executable, str(REPO / "data" / "prepare.py"), "--fasta", str(fasta), "--out", str(data),
                    "--name", "x", "--num_valid", "10", "--num_test", "10"], check=True, capture_output=True)
    tokens = ["<pad>", "<unk>", "<mask>", "<bos>", "<eos>", *(t for t in VOCAB[4:29] if t != "X")]
    other = remap_vocabulary(esm_dir, tokens, tmp_path / "other")
    with pytest.raises(HFError, match="has no token for X, which the frozen valid set masks"):
        score(other, data, splits=["valid"], tokens_per_batch=2048)


def test_a_model_registered_only_as_automodel_loads_with_trust_remote_code(checkpoint, exported, small_shards,
                                                                          tmp_path):
    """AMPLIFY's remote code registers AutoModel only. Our exported folder, so registered and given another
    model_type, is foreign code: refused without --trust_remote_code, and scored as our own folder is with it."""
    other = tmp_path / "remote"
    other.mkdir()
    for f in exported.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": config["auto_map"]["AutoConfig"],
                          "AutoModel": config["auto_map"]["AutoModelForMaskedLM"]}
    (other / "config.json").write_text(json.dumps(config | {"model_type": "someone-elses"}))
    args = dict(splits=["valid"], tokens_per_batch=2048, max_len=512)
    with pytest.raises(HFError, match="pass --trust_remote_code if you trust it"):
        score(other, small_shards, **args)
    remote = score(other, small_shards, trust_remote_code=True, **args)
    ours = score(exported, small_shards, **args)
    for key in ("valid_loss", "valid_801010_loss"):
        assert remote[key] == pytest.approx(ours[key], rel=1e-5)


def test_export_refuses_a_file_that_is_not_a_train_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(HFError, match="not a checkpoint written by train.py"):
        export(tmp_path / "other.pt", tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------------
# --protocol reference: the published evaluator (Synthyra/SpeedrunningPLMs evaluation/benchmark_esm.py + masker.py)

def valid_letters(shards: Path) -> list[str]:
    tokens = read_shard(sorted(shards.glob("*_valid_*.bin"))[0])
    return ["".join(VOCAB[t] for t in tokens[a + 1:a + n - 1]) for a, n in zip(*documents(tokens))]


def reference_by_hand(model_dir: Path, shards: Path, tokenizer_dir: Path, max_len=1022, to_model_ids=None):
    """The published evaluator redone in its own terms: letters sorted longest first, a DataLoader of 4 whose
    collate tokenizes (truncating to max_len tokens), draws masks from torch's global generator seeded 42, and the
    mean of per-batch mean cross-entropies. Returns the loss and each batch's labels [4, L] (-100 where unmasked)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    model = transformers.AutoModelForMaskedLM.from_pretrained(model_dir, trust_remote_code=True).eval()

    def collate(seqs):
        enc = tokenizer(seqs, padding="longest", max_length=max_len, truncation=True, return_tensors="pt")
        ids, att = enc["input_ids"], enc["attention_mask"].bool()
        masked = (torch.rand(ids.shape) < 0.15) & att & (ids != CLS) & (ids != EOS)
        for row in range(len(seqs)):
            if not masked[row].any() and att[row].sum() > 2:
                where = torch.nonzero(att[row] & (ids[row] != CLS) & (ids[row] != EOS))[:, 0]
                masked[row, where[torch.randint(len(where), (1,))]] = True
        return torch.where(masked, MASK, ids), att, torch.where(masked, ids, -100)

    losses, labels_seen = [], []
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(42)
        loader = torch.utils.data.DataLoader(sorted(valid_letters(shards), key=len, reverse=True), batch_size=4,
                                             collate_fn=collate)
        for ids, att, labels in loader:
            labels_seen.append(labels)
            if to_model_ids is not None:
                ids, labels = to_model_ids[ids], torch.where(labels >= 0, to_model_ids[labels.clamp(min=0)], -100)
            logits = model(input_ids=ids, attention_mask=att.long()).logits
            losses.append(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).item())
    return sum(losses) / len(losses), labels_seen


def assert_same_masks(shards: Path, hand_labels, max_len=1022):
    """The masks of reference_batches, row by row, are the hand computation's bit for bit."""
    batches = list(reference_batches(split_documents(sorted(shards.glob("*_valid_*.bin"))), max_len))
    assert len(batches) == len(hand_labels)
    for (b, rows), labels in zip(batches, hand_labels):
        lengths = document_lengths(b.input_ids, b.doc_ids)
        assert rows == len(lengths) == len(labels)
        at = b.mask_idx[b.targets >= 0]
        row = torch.searchsorted(lengths.cumsum(0), at, right=True)
        col = at - (lengths.cumsum(0) - lengths)[row]
        assert torch.equal(torch.stack([row, col], 1), torch.nonzero(labels >= 0))
        assert torch.equal(b.targets[b.targets >= 0], labels[labels >= 0])


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory) -> Path:
    """A valid split of the reference's edge cases: one-residue sequences (a mask forced on them), ties in length
    (stable order), and sequences of 1,020 to 2,000 residues (truncated to 1,020)."""
    rng = np.random.default_rng(3)
    lengths = [1, 2, 1, 3, 5, 5, 5, 5, 5, 8, 30, 30, 1020, 1021, 1022, 1500, 2000, 40, 1]
    out = tmp_path_factory.mktemp("odd")
    for split, ns in (("train", [50, 60]), ("valid", lengths), ("test", [70])):
        seqs = ["".join(rng.choice(list("LAGVSERTIDPKQNFYMHWC"), n)) for n in ns]
        (out / f"{split}.fasta").write_text("".join(f">{split}{i}\n{s}\n" for i, s in enumerate(seqs)))
    subprocess.run([sys.executable, str(REPO / "data" / "prepare.py"), "--train", str(out / "train.fasta"),
                    "--valid", str(out / "valid.fasta"), "--test", str(out / "test.fasta"), "--name", "odd",
                    "--out", str(out / "shards")], check=True, capture_output=True)
    return out / "shards"


def test_the_reference_protocol_is_the_published_evaluator_redone_by_hand(esm_dir, small_shards, odd_shards):
    for shards in (small_shards, odd_shards):
        scores = score(esm_dir, shards, splits=["valid"], protocol="reference")
        loss, labels = reference_by_hand(esm_dir, shards, esm_dir)
        assert_same_masks(shards, labels)
        assert scores["protocol"] == "reference" and scores["max_len"] == 1022
        assert scores["valid_batches"] == len(labels) and scores["valid_sequences"] == len(valid_letters(shards))
        assert scores["valid_tokens"] == sum((lab >= 0).sum().item() for lab in labels)
        assert scores["valid_loss"] == pytest.approx(loss, rel=1e-6)


def test_the_reference_masks_follow_the_protocol(small_shards, odd_shards):
    docs = split_documents(sorted(odd_shards.glob("*_valid_*.bin")))
    batches = list(reference_batches(docs))
    assert [(b.input_ids.tolist(), b.targets.tolist()) for b, _ in batches] == \
           [(b.input_ids.tolist(), b.targets.tolist()) for b, _ in reference_batches(docs)]  # seed 42: the same
    kept = sorted((len(d) - 2 for d in docs), reverse=True)
    assert sum(n for _, n in batches) == len(docs) == 19  # none dropped
    assert [n for _, n in batches] == [4, 4, 4, 4, 3]
    seen = []
    for b, _ in batches:
        lengths = document_lengths(b.input_ids, b.doc_ids)
        starts = lengths.cumsum(0) - lengths
        at, targets = b.mask_idx[b.targets >= 0], b.targets[b.targets >= 0]
        assert (b.input_ids[at] == MASK).all() and not set(targets.tolist()) & {CLS, EOS, PAD, MASK}
        row = torch.searchsorted(lengths.cumsum(0), at, right=True)
        assert ((at > starts[row]) & (at < starts[row] + lengths[row] - 1)).all()  # never <cls> or <eos>
        assert (torch.bincount(row, minlength=len(lengths)) >= 1).all()  # every sequence has a masked residue
        assert (b.input_ids[starts] == CLS).all() and (b.input_ids[starts + lengths - 1] == EOS).all()
        seen += lengths.tolist()
    assert seen == [min(n, 1020) + 2 for n in kept]  # cut to <cls>, the first 1,020 residues, <eos>
    longest, first = docs[[len(d) for d in docs].index(2002)], batches[0][0].input_ids[:1022].numpy()
    assert ((first[:-1] == longest[:1021]) | (first[:-1] == MASK)).all() and first[-1] == EOS
    # 15% of the residues of real sequences, mask-only
    b = list(reference_batches(split_documents(sorted(small_shards.glob("*_valid_*.bin")))))
    rate = sum((x.targets >= 0).sum().item() for x, _ in b) / sum(len(d) - 2 for d in split_documents(
        sorted(small_shards.glob("*_valid_*.bin"))))
    assert 0.14 < rate < 0.16


def test_the_reference_protocol_scores_our_exported_folder_and_another_vocabulary(exported, other_vocab_dir, esm_dir,
                                                                                  small_shards, odd_shards, tmp_path):
    out = tmp_path / "scores.json"
    r = run_hf("score", str(exported), "--data", str(odd_shards), "--protocol", "reference", "--max_len", "512",
               "--splits", "valid", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "valid reference: loss " in r.stdout
    scores = json.loads(out.read_text())
    loss, labels = reference_by_hand(exported, odd_shards, esm_dir, max_len=512)
    assert_same_masks(odd_shards, labels, max_len=512)
    assert scores["protocol"] == "reference" and scores["valid_loss"] == pytest.approx(loss, rel=1e-5)

    theirs = transformers.AutoTokenizer.from_pretrained(other_vocab_dir)
    to_model_ids = torch.tensor(theirs.convert_tokens_to_ids([{"<cls>": "<bos>"}.get(t, t) for t in VOCAB]))
    loss, _ = reference_by_hand(other_vocab_dir, small_shards, esm_dir, to_model_ids=to_model_ids)
    other = score(other_vocab_dir, small_shards, splits=["valid"], protocol="reference")
    assert other["valid_loss"] == pytest.approx(loss, rel=1e-5)


def test_a_bad_protocol_or_missing_data_is_one_line_without_traceback(exported, small_shards, tmp_path):
    for args, says in ((["--data", str(small_shards), "--protocol", "published"], "--protocol published: unknown"),
                       (["--data", str(tmp_path / "nowhere"), "--protocol", "reference"], "no *_valid_*.bin shards")):
        r = run_hf("score", str(exported), *args)
        assert r.returncode == 1 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
