"""tools/hf.py: a real tiny checkpoint exported as a Hugging Face folder, and scoring with the frozen metric."""
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
from dataloader import PAD, VOCAB, assemble, eval_batches
from model import PRESETS, Model
from test_train import REPO, tiny
from train import SCHEMES, metric_key
from tools.hf import HFError, export, save_tokenizer, score


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
                "data_sha256": train.data_sha256(h.data)}, path)
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
    tokens, lengths = encode(("test", 1, 0, fasta, "valid"))[0]["valid"]
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
    r = run_hf("score", str(exported), "--data", str(small_shards), "--max_len", "512", "--tokens_per_batch", "2048",
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
