"""Hugging Face interop: export a checkpoint as a model folder; score any protein masked LM on our frozen sets.

    python -m tools.hf export checkpoints/step_000200.pt --out hf/plmrun-sp2014
    python -m tools.hf score hf/plmrun-sp2014 --data data/sp2014
    python -m tools.hf score path/to/esm2_t6_8M_UR50D --data data/sp2014 [--splits valid] [--device cuda]
    python -m tools.hf score path/to/AMPLIFY_120M --data data/sp2014 --trust_remote_code

An exported folder holds model.safetensors, config.json, the ESM-2 tokenizer, this checkout's model.py and a small
wrapper (tools/hf_export/modeling_plmrun.py): AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True) loads
it. `score` is train.py's frozen evaluation (the same batches and masks, train.evaluate's token-weighted
cross-entropy and accuracy) for such a folder or any EsmForMaskedLM folder (ESM-2 8M..3B); for our own folders it
gives exactly the losses of `train.py --eval_only` on the checkpoint. A model with another vocabulary (AMPLIFY's,
say) is scored on the same masked residues through its own token ids, with cross-entropy over its whole
vocabulary. transformers and safetensors are needed here only: training never imports this module.
"""
import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

import train
from dataloader import PAD, STANDARD_AA, VOCAB, check_tokens_per_batch, eval_batches
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
                      f"export it with the code it was trained with (python -m tools.records reproduce LOG).\n{e}")
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


def load_for_scoring(model_dir: Path, device: torch.device, max_len: int, trust_remote_code: bool = False):
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
        raise HFError(f"{model_dir} takes documents of at most {limit} tokens, the frozen sets crop them at {max_len}; "
                      f"pass --max_len {limit} (the losses are then those of sequences cropped to {limit - 2} "
                      "residues, not comparable with the 1024-token frozen metric)")
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


def score(model_dir: Path, data: Path, splits=("valid", "test"), tokens_per_batch: int = 65536, max_len: int = 1024,
          device: str = "cpu", trust_remote_code: bool = False) -> dict:
    """train.py's frozen-set losses and accuracies of a model folder, under the keys train.py logs them with."""
    device = torch.device(device)
    try:
        check_tokens_per_batch(tokens_per_batch, max_len)
    except ValueError as e:
        raise HFError(f"--tokens_per_batch {tokens_per_batch}: {e}")
    shards = {split: sorted(data.glob(f"*_{split}_*.bin")) for split in splits}
    for split, files in shards.items():
        if not files:
            raise HFError(f"--data {data}: no *_{split}_*.bin shards; make them with data/prepare.py (README: Setup)")
    model = load_for_scoring(model_dir, device, max_len, trust_remote_code)
    window = torch.tensor(max_len, dtype=torch.int32, device=device)
    results = {"model": str(model_dir), "data": str(data), "data_sha256": train.data_sha256(data), "max_len": max_len}
    for split in splits:
        for scheme in train.SCHEMES:
            batches = [b.to(device) for b in eval_batches(shards[split], tokens_per_batch, scheme, max_len=max_len)]
            if isinstance(model, OtherVocabulary):
                masked = torch.cat([b.targets[b.targets >= 0] for b in batches]).unique()
                lacking = [VOCAB[t] for t in masked.tolist() if model.columns[t] < 0]
                if lacking:
                    raise HFError(f"{model_dir}: its tokenizer has no token for {' '.join(lacking)}, which the frozen "
                                  f"{split} set masks: the model cannot score those residues")
            r = train.evaluate(model, batches, window)
            key = train.metric_key(split, scheme)
            results.update({f"{key}_loss": r["loss"], f"{key}_accuracy": r["accuracy"], f"{key}_tokens": r["tokens"]})
            print(f"{split} {scheme}: loss {r['loss']:.4f} accuracy {r['accuracy']:.4f} ({r['tokens']:,} masked tokens)",
                  flush=True)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="a train.py checkpoint as a Hugging Face model folder")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("--out", type=Path, required=True, help="the folder to write")
    s = sub.add_parser("score", help="frozen validation/test losses of a Hugging Face model folder")
    s.add_argument("model_dir", type=Path)
    s.add_argument("--data", type=Path, required=True, help="a shard folder made by data/prepare.py")
    s.add_argument("--splits", nargs="+", default=["valid", "test"], choices=["valid", "test"])
    s.add_argument("--tokens_per_batch", type=int, default=65536,
                   help="tokens of one packed evaluation batch (train.py's --tokens_per_rank); lower it if memory "
                        "runs out: other models' losses do not depend on it")
    s.add_argument("--max_len", type=int, default=1024, help="documents are cropped to this many tokens")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    s.add_argument("--out", type=Path, help="the JSON file of the scores (default: scores_MODELNAME.json here)")
    s.add_argument("--trust_remote_code", action="store_true",
                   help="run modelling and tokenizer code shipped in the folder (AMPLIFY's, for one)")
    a = p.parse_args(argv)
    if a.command == "export":
        print(f"wrote {export(a.checkpoint, a.out)}")
        return
    results = score(a.model_dir, a.data, a.splits, a.tokens_per_batch, a.max_len, a.device, a.trust_remote_code)
    out = a.out or Path(f"scores_{a.model_dir.resolve().name}.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except HFError as e:
        sys.exit(f"hf: {e}")
