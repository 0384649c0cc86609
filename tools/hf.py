"""Hugging Face interop: export a checkpoint as a model folder; score any protein masked LM on our frozen sets.

    python -m tools.hf export checkpoints/step_000200.pt --out hf/plmrun-sp2014
    python -m tools.hf score hf/plmrun-sp2014 --data data/sp2014
    python -m tools.hf score path/to/esm2_t6_8M_UR50D --data data/sp2014 [--splits valid] [--device cuda]
    python -m tools.hf score path/to/AMPLIFY_120M --data data/sp2014 --trust_remote_code
    python -m tools.hf score path/to/esm2_t30_150M_UR50D --data data/omgprot50 --protocol reference

An exported folder holds model.safetensors, config.json, the ESM-2 tokenizer, this checkout's model.py and a small
wrapper (tools/hf_export/modeling_plmrun.py): AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True) loads
it. `score` is train.py's frozen evaluation (the same batches and masks, train.evaluate's token-weighted
cross-entropy and accuracy) for such a folder or any EsmForMaskedLM folder (ESM-2 8M..3B); for our own folders it
gives exactly the losses of `train.py --eval_only` on the checkpoint. A model with another vocabulary (AMPLIFY's,
say) is scored on the same masked residues through its own token ids, with cross-entropy over its whole
vocabulary. `--protocol reference` scores instead with the published evaluator of the OMGprot50 numbers (see
reference_batches). transformers and safetensors are needed here only. train.py imports this module only to push
a finished run's checkpoint (--hf_repo, push_to_hub); training itself never does.
"""
import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import train
from dataloader import (BLOCK, EOS, MASK, PAD, STANDARD_AA, VOCAB, assemble, check_tokens_per_batch, documents,
                        eval_batches, read_shard, to_batch, verified_fingerprint)
from model import PRESETS, Model

REPO = Path(__file__).resolve().parent.parent
WRAPPER = Path(__file__).resolve().parent / "hf_export" / "modeling_plmrun.py"


class HFError(Exception):
    pass


def export(checkpoint: Path, out: Path) -> Path:
    """Write the Hugging Face folder of a train.py checkpoint."""
    from safetensors.torch import save_file
    if not checkpoint.is_file():
        raise HFError(f"{checkpoint}: no such checkpoint file")
    try:
        ckpt = train.load_checkpoint(checkpoint)
    except ValueError as e:
        raise HFError(str(e)) from e
    h = ckpt["hyperparameters"]
    cfg = dataclasses.replace(PRESETS[h["preset"]], max_len=h["max_len"])
    try:  # a mismatch is caught here, not when someone loads the folder
        Model(cfg).load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise HFError(f"{checkpoint}: its weights do not fit preset {h['preset']!r} of this checkout's model.py; "
                      "export it with the code it was trained with (python -m tools.records reproduce LOG --out "
                      f"DIR).\n{e}")
    out.mkdir(parents=True, exist_ok=True)
    save_file({f"model.{k}": v.contiguous() for k, v in ckpt["model"].items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    config = {"architectures": ["PlmrunForMaskedLM"], "model_type": "plmrun",
              "auto_map": {"AutoConfig": "modeling_plmrun.PlmrunConfig",
                           "AutoModelForMaskedLM": "modeling_plmrun.PlmrunForMaskedLM"},
              **dataclasses.asdict(cfg), "pad_token_id": PAD, "dtype": "float32",
              "plmrun": {"preset": h["preset"], "step": ckpt.get("step"), "run_id": ckpt.get("run_id"),
                         "data_sha256": ckpt.get("data_sha256")}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(REPO / "model.py", out)
    shutil.copy(WRAPPER, out)
    save_tokenizer(out, cfg.max_len)
    return out


def save_tokenizer(out: Path, max_len: int) -> None:
    """ESM-2's tokenizer: our VOCAB in order, one token a line."""
    from transformers import EsmTokenizer
    (out / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    EsmTokenizer(str(out / "vocab.txt"), model_max_length=max_len).save_pretrained(out)


def push_to_hub(path: Path, repo: str) -> str:
    """train.py --hf_repo: upload a run's final checkpoint as REPO/model.pt; returns the repo's address."""
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_file(path_or_fileobj=str(path), path_in_repo="model.pt", repo_id=repo)
    return f"https://huggingface.co/{repo}"


# ----------------------------------------------------------------------------------------------------------------
# scoring

def document_lengths(input_ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """The lengths of a packed evaluation buffer's real documents, which fill its start in order; each <pad> of the
    buffer's tail is a document of its own, with nothing masked, and is left out."""
    _, lengths = torch.unique_consecutive(doc_ids, return_counts=True)
    return lengths[input_ids[lengths.cumsum(0) - lengths] != PAD]


class PackedRows(torch.nn.Module):
    """A [batch, length] masked LM called like our Model on a packed evaluation buffer: every document becomes a row
    of its own (attention mask 1 on its tokens), so each sequence is seen as if it ran alone; ESM-2's token dropout,
    which rescales embeddings by the share of <mask> in the row, depends on that."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids, doc_ids, mask_idx, targets, window):
        lengths = document_lengths(input_ids, doc_ids)
        starts = lengths.cumsum(0) - lengths
        col = torch.arange(int(lengths.max()), device=input_ids.device)
        attention_mask = col < lengths[:, None]
        rows = torch.where(attention_mask, input_ids[(starts[:, None] + col).clamp(max=len(input_ids) - 1)], PAD)
        logits = self.hf(input_ids=rows.long(), attention_mask=attention_mask.long()).logits
        # the real documents fill the start of the buffer, so their tokens row by row are buffer positions
        return logits[attention_mask][mask_idx].float()


class OtherVocabulary(torch.nn.Module):
    """A masked LM with a vocabulary of its own, called like our Model on a packed evaluation buffer: each document
    alone (so no padding, whose mask argument differs between models), in its own token ids. It returns
    log-probabilities over its whole vocabulary, in our token order first (-inf for a token it lacks), then its
    tokens we lack: cross-entropy and argmax over these columns are those over its own vocabulary."""

    def __init__(self, hf_model, reads: torch.Tensor, columns: torch.Tensor):
        super().__init__()
        self.hf = hf_model
        self.register_buffer("reads", reads)  # see vocabulary_map
        self.register_buffer("columns", columns)

    def forward(self, input_ids, doc_ids, mask_idx, targets, window):
        lengths = document_lengths(input_ids, doc_ids)
        logp = torch.cat([self.hf(self.reads[doc.long()][None]).logits[0].float().log_softmax(-1)
                          for doc in input_ids[:int(lengths.sum())].split(lengths.tolist())])[mask_idx]
        rest = torch.ones(logp.size(-1), dtype=torch.bool, device=logp.device)
        rest[self.columns[self.columns >= 0]] = False
        ours = logp[:, self.columns.clamp(min=0)].masked_fill(self.columns < 0, float("-inf"))
        return torch.cat([ours, logp[:, rest]], dim=-1)


SPECIAL_ROLES = {"<cls>": ("cls_token", "bos_token"), "<pad>": ("pad_token",), "<eos>": ("eos_token", "sep_token"),
                 "<unk>": ("unk_token",), "<mask>": ("mask_token",)}


def vocabulary_map(model_dir: Path, trust_remote_code: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """None for ESM-2's vocabulary. Otherwise, for each of our token ids: the model's id it reads (matched by residue
    letter or by the tokenizer's special-token role, <unk> where it lacks the token) and the model's id whose
    probability our column shows (-1 for none: lacking, or shown by another column already)."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise HFError(f"{model_dir}: cannot load its tokenizer ({e}); the folder needs the tokenizer files of the "
                      "model (for ESM-2: vocab.txt and tokenizer_config.json; a model with its own tokenizer code "
                      "also needs --trust_remote_code)")
    vocab = tokenizer.get_vocab()
    if sorted(vocab, key=vocab.get) == VOCAB:
        return None
    found = []
    for token in VOCAB:
        names = [getattr(tokenizer, role, None) for role in SPECIAL_ROLES.get(token, ())] or [token]
        found.append(next((vocab[n] for n in names if n in vocab), -1))
    needed = ["<cls>", "<eos>", "<unk>", "<mask>", *VOCAB[STANDARD_AA[0]:STANDARD_AA[1]]]
    missing = [t for t, i in zip(VOCAB, found) if i < 0 and t in needed]
    if missing:
        raise HFError(f"{model_dir}: its tokenizer ({len(vocab)} tokens) has no token for {' '.join(missing)}; a "
                      "masked protein LM needs the 20 amino acids as single letters, mask and unknown tokens, a "
                      "start (cls or bos) and an end (eos) token")
    columns = [-1] * len(VOCAB)
    for t in sorted(range(len(VOCAB)), key=lambda t: VOCAB[t] in SPECIAL_ROLES):  # an unk token "X" shows as X
        if found[t] not in columns:  # each probability in one column only, or cross-entropy would count it twice
            columns[t] = found[t]
    unk = found[VOCAB.index("<unk>")]
    return torch.tensor([i if i >= 0 else unk for i in found]), torch.tensor(columns)


def load_for_scoring(model_dir: Path, device: torch.device, max_len: int, trust_remote_code: bool = False,
                     protocol: str = "frozen"):
    """The model of a folder, callable as our Model: ours unwrapped (exactly train.py's evaluation), other ESM-2
    vocabulary models in PackedRows, other vocabularies in OtherVocabulary. Refuses a model that takes fewer than
    max_len tokens."""
    from transformers import AutoModel, AutoModelForMaskedLM
    if not (model_dir / "config.json").is_file():
        raise HFError(f"{model_dir} has no config.json; pass a Hugging Face model folder (save_pretrained's output "
                      "or one exported by python -m tools.hf export)")
    config = json.loads((model_dir / "config.json").read_text())
    ours = config.get("model_type") == "plmrun"  # our own code, copied into the folder at export: trusted
    trust_remote_code = trust_remote_code or ours
    mapping = vocabulary_map(model_dir, trust_remote_code)
    # ESM counts <cls> and <eos> in its positions and (like RoBERTa) keeps two: 1026 positions take 1024 tokens
    limit = config["max_len"] if ours else config.get("max_position_embeddings", max_len + 2) - 2
    if max_len > limit:
        raise HFError(f"{model_dir} takes documents of at most {limit} tokens, the {protocol} protocol crops them at "
                      f"{max_len}; pass --max_len {limit} (the losses are then those of sequences cropped to "
                      f"{limit - 2} residues, not comparable with the {max_len}-token {protocol} metric)")
    auto_map = config.get("auto_map", {})
    base_only = "AutoModel" in auto_map and "AutoModelForMaskedLM" not in auto_map  # AMPLIFY's code registers so
    auto = AutoModel if base_only and trust_remote_code else AutoModelForMaskedLM
    try:
        hf = auto.from_pretrained(model_dir, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except ValueError as e:
        hint = "; it ships its own modelling code: pass --trust_remote_code if you trust it" if auto_map else ""
        raise HFError(f"{model_dir}: transformers cannot build it as a masked LM ({e}){hint}")
    hf.to(device).eval()
    if mapping is not None:
        return OtherVocabulary(hf, *mapping).to(device)
    if not ours:
        return PackedRows(hf)
    # compiled on the GPU, as train.py does: FlexAttention run eagerly materialises the T x T scores
    return torch.compile(hf.model, dynamic=False, fullgraph=True) if device.type == "cuda" else hf.model


def data_fingerprint(data: Path) -> str:
    """The shards' fingerprint as train.py logs it; for a folder without a usable manifest, why there is none."""
    try:
        return verified_fingerprint(data)
    except ValueError as e:
        return f"none ({e})"


PROTOCOLS = {"frozen": "train.py's frozen evaluation sets and metric",
             "reference": "the published OMGprot50 evaluator's (reference_batches)"}
DEFAULT_MAX_LEN = {"frozen": 1024, "reference": 1022}


def score(model_dir: Path, data: Path, splits=("valid", "test"), tokens_per_batch: int = 65536,
          max_len: int | None = None, device: str = "cpu", trust_remote_code: bool = False,
          protocol: str = "frozen") -> dict:
    """The losses and accuracies of a model folder on a shard folder's splits: train.py's frozen-set metrics under
    the keys train.py logs them with (protocol "frozen"), or the published evaluator's (protocol "reference")."""
    if protocol not in PROTOCOLS:
        choices = " or ".join(f"{k} ({v})" for k, v in PROTOCOLS.items())
        raise HFError(f"--protocol {protocol}: unknown; choose {choices}")
    max_len = max_len or DEFAULT_MAX_LEN[protocol]
    device = torch.device(device)
    if protocol == "frozen":
        try:
            check_tokens_per_batch(tokens_per_batch, max_len)
        except ValueError as e:
            raise HFError(f"--tokens_per_batch {tokens_per_batch}: {e}")
    shards = {split: sorted(data.glob(f"*_{split}_*.bin")) for split in splits}
    for split, files in shards.items():
        if not files:
            raise HFError(f"--data {data}: no *_{split}_*.bin shards; make them with data/prepare.py (README: Setup)")
    model = load_for_scoring(model_dir, device, max_len, trust_remote_code, protocol)
    window = torch.tensor(max_len, dtype=torch.int32, device=device)
    results = {"model": str(model_dir), "data": str(data), "data_sha256": data_fingerprint(data), "max_len": max_len,
               "protocol": protocol}
    for split in splits:
        if protocol == "reference":
            results.update(score_reference(model, model_dir, split, shards[split], max_len, window))
            continue
        for scheme in train.SCHEMES:
            try:
                batches = [b.to(device) for b in eval_batches(shards[split], tokens_per_batch, scheme, max_len=max_len)]
            except (OSError, ValueError) as e:  # a corrupt or foreign shard
                raise HFError(str(e))
            check_masked_residues(model, model_dir, torch.cat([b.targets for b in batches]), f"frozen {split} set")
            r = train.evaluate(model, batches, window)
            key = train.metric_key(split, scheme)
            results.update({f"{key}_loss": r["loss"], f"{key}_accuracy": r["accuracy"], f"{key}_tokens": r["tokens"]})
            print(f"{split} {scheme}: loss {r['loss']:.4f} accuracy {r['accuracy']:.4f} ({r['tokens']:,} masked tokens)",
                  flush=True)
    return results


def check_masked_residues(model, model_dir: Path, targets: torch.Tensor, where: str) -> None:
    """A model with another vocabulary cannot score a masked residue it has no token for: refuse, naming it."""
    if not isinstance(model, OtherVocabulary):
        return
    masked = targets[targets >= 0].unique().cpu()
    lacking = [VOCAB[t] for t in masked.tolist() if model.columns[t] < 0]
    if lacking:
        raise HFError(f"{model_dir}: its tokenizer has no token for {' '.join(lacking)}, which the {where} masks: the "
                      "model cannot score those residues")


# ----------------------------------------------------------------------------------------------------------------
# the published evaluator (Synthyra/SpeedrunningPLMs, evaluation/benchmark_esm.py and evaluation/masker.py)

def split_documents(files: list) -> list[np.ndarray]:
    """The documents (`<cls> residues <eos>` token arrays) of a split's shards, in shard order."""
    docs = []
    for f in files:
        try:
            tokens = read_shard(f)
        except (OSError, ValueError) as e:
            raise HFError(str(e))
        starts, lengths = documents(tokens)
        docs += [np.asarray(tokens[a:a + n]) for a, n in zip(starts.tolist(), lengths.tolist())]
    return docs


def reference_batches(docs: list, max_len: int = 1022, batch_size: int = 4, mask_rate: float = 0.15,
                      seed: int = 42):
    """The published evaluator's batches of a split, each as a packed Batch of round_up(batch_size * max_len)
    tokens (one shape, so one compiled graph serves them all); yields (Batch, number of sequences in it).

    What the reference does (benchmark_esm.py with its ProteinMasker; sequences read from the split's parquet):
    - every sequence is kept; they are sorted by residue count, longest first (Python's stable sort, so ties keep
      the file's order), and cut into batches of 4 in that order (the last may be shorter);
    - the ESM-2 tokenizer adds <cls>/<eos> and truncates to 1,022 tokens: <cls>, the first 1,020 residues, <eos>;
      each batch is padded to its longest row with an attention mask;
    - torch's global generator is seeded 42 once per (model, split), before the model is loaded; the DataLoader
      (num_workers 0) draws one int64 from it when iterated, then each batch, in order, draws torch.rand(rows,
      padded length) on the CPU and masks a position where that is < 0.15 and the token is neither <cls>, <eos> nor
      padding (every masked token becomes <mask>: no 80/10/10);
    - a row left with no masked token and more than two real tokens then draws torch.randint(its residue count,
      (1,)) (rows in order) and masks that residue: every non-empty sequence has at least one;
    - the batch's loss is the model's mean cross-entropy over its masked tokens; the score is the plain mean of
      the per-batch losses (not token-weighted), its accuracy the share of all masked tokens predicted right.
    Its published OMGprot50 numbers for ESM2-150M (float32, transformers 4.57.6): valid 2.390 over 303,545 masked
    tokens in 2,500 batches, test 2.391 over 307,141; the masked-token count checks the masks.

    Here a torch.Generator seeded 42 makes the same draws in the same order on the same (B, L) shapes, so with the
    same sequences in the same file order the masks are bit-identical to the reference's on the CPU generator,
    assuming its model loading drew nothing from the global generator (transformers' from_pretrained skips weight
    initialisation; a checkpoint missing weights would be initialised randomly there and shift every mask). Not
    identical: the sequences come from our shards (one <unk> per unknown letter, where ESM-2's tokenizer makes a
    run of unknown letters one <unk>, and no lower-case letters), the loss is summed in another order than
    transformers' (float32 rounding, ~1e-7), and the model runs as load_for_scoring runs it (float32 for other
    models as there, bfloat16 on the GPU for ours; another vocabulary through its own ids, which the reference never
    had)."""
    g = torch.Generator().manual_seed(seed)
    # the DataLoader's _base_seed draw (torch.utils.data.dataloader._BaseDataLoaderIter) comes before any mask
    torch.empty((), dtype=torch.int64).random_(generator=g)
    capacity = -(-batch_size * max_len // BLOCK) * BLOCK
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))  # stable: ties in file order
    for k in range(0, len(order), batch_size):
        rows = [docs[i] if len(docs[i]) <= max_len else np.concatenate([docs[i][:max_len - 1], [EOS]])
                for i in order[k:k + batch_size]]
        n = torch.tensor([len(r) for r in rows])
        col = torch.arange(int(n.max()))
        chosen = (torch.rand(len(rows), len(col), generator=g) < mask_rate) & (col >= 1) & (col < n[:, None] - 1)
        for r in range(len(rows)):
            if not chosen[r].any() and n[r] > 2:
                chosen[r, 1 + torch.randint(int(n[r]) - 2, (1,), generator=g)] = True
        offsets = (n.cumsum(0) - n).tolist()
        mask_idx = np.concatenate([o + np.flatnonzero(c.numpy()) for o, c in zip(offsets, chosen)])
        ids, doc_ids = assemble(rows, n.numpy(), capacity)
        targets = ids[mask_idx].astype(np.int64)
        ids[mask_idx] = MASK
        yield to_batch(ids, doc_ids, mask_idx, targets, capacity), len(rows)


def score_reference(model, model_dir: Path, split: str, files: list, max_len: int, window: torch.Tensor) -> dict:
    """One split's loss (mean of per-batch mean losses) and accuracy under the published evaluator's protocol."""
    docs = split_documents(files)
    if not docs:
        raise HFError(f"{files[0].parent}: the {split} shards hold no sequences")
    losses, correct, count = [], 0, 0
    with torch.no_grad():
        for b, _ in reference_batches(docs, max_len):
            check_masked_residues(model, model_dir, b.targets, f"reference protocol on the {split} set")
            b = b.to(window.device)
            logits = model(b.input_ids, b.doc_ids, b.mask_idx, None, window)
            labelled = b.targets != -100
            losses.append(F.cross_entropy(logits, b.targets, ignore_index=-100).item())
            correct += ((logits.argmax(-1) == b.targets) & labelled).sum().item()
            count += labelled.sum().item()
    loss = sum(losses) / len(losses)  # the reference adds the batch losses as Python floats, in order
    print(f"{split} reference: loss {loss:.4f} accuracy {correct / count:.4f} ({count:,} masked tokens, "
          f"{len(docs):,} sequences in {len(losses):,} batches of 4)", flush=True)
    return {f"{split}_loss": loss, f"{split}_accuracy": correct / count, f"{split}_tokens": count,
            f"{split}_sequences": len(docs), f"{split}_batches": len(losses)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="a train.py checkpoint as a Hugging Face model folder")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--out", type=Path, required=True, help="the folder to write")
    s = sub.add_parser("score", help="validation/test losses of a Hugging Face model folder")
    s.add_argument("model_dir", type=Path)
    s.add_argument("--data", type=Path, required=True, help="a shard folder made by data/prepare.py")
    s.add_argument("--protocol", default="frozen",
                   help="frozen (default: train.py's frozen sets and metric) or reference (the published OMGprot50 "
                        "evaluator: 15%% mask-only, batches of 4 sorted by length, mean of per-batch losses, seed 42)")
    s.add_argument("--splits", nargs="+", default=["valid", "test"], choices=["valid", "test"])
    s.add_argument("--tokens_per_batch", type=int, default=65536,
                   help="tokens of one packed evaluation batch (train.py's --tokens_per_rank); lower it if memory "
                        "runs out: other models' losses do not depend on it (frozen protocol only)")
    s.add_argument("--max_len", type=int, help="documents are cropped to this many tokens (default: 1024 frozen, "
                                                "1022 reference, as the published evaluator truncates)")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    s.add_argument("--out", type=Path, help="the JSON file of the scores (default: scores_MODELNAME.json here, "
                                            "scores_MODELNAME_reference.json for the reference protocol)")
    s.add_argument("--trust_remote_code", action="store_true",
                   help="run modelling and tokenizer code shipped in the folder (AMPLIFY's, for one)")
    a = p.parse_args(argv)
    if a.command == "export":
        print(f"wrote {export(a.checkpoint, a.out)}")
        return
    results = score(a.model_dir, a.data, a.splits, a.tokens_per_batch, a.max_len, a.device, a.trust_remote_code,
                    a.protocol)
    suffix = "" if a.protocol == "frozen" else f"_{a.protocol}"
    out = a.out or Path(f"scores_{a.model_dir.resolve().name}{suffix}.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except HFError as e:
        sys.exit(f"hf: {e}")
