"""The OMGprot50 shards: downloaded packed from the Hugging Face hub, or tokenized here.

    python data/download_omgprot50.py --out data/omg                   # every shard (100M tokens each)
    python data/download_omgprot50.py --out data/omg --num_chunks 4    # valid, test and the first 4 train shards
    python data/download_omgprot50.py --out data/omg --tokenize        # build them from tattabio/OMG_prot50 with
                                                                       # data/prepare.py (its flags may follow)

The hub repo's files `{prefix}_{train|val|valid|test}_NNNNNN.bin` land in --out as `{prefix}_{split}_NNNNNN.bin`
with `val` renamed `valid`, the name the trainer looks for. A shard becomes visible under its final name only after
its header has been checked, so an interrupted run leaves no half shard; run the command again to resume.
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import os
import re
import shlex
import shutil

from dataloader import shard_tokens, write_manifest

REPO = "Synthyra/omg_prot50_packed"
SHARD = re.compile(r"(?P<prefix>.+)_(?P<split>train|val|valid|test)_(?P<index>\d{6})\.bin")


def local_name(remote: str) -> str:
    m = SHARD.fullmatch(Path(remote).name)
    return f"{m['prefix']}_{'valid' if m['split'] == 'val' else m['split']}_{m['index']}.bin"


def remote_shards(repo: str, num_chunks: int | None) -> list:
    """The hub's shard files to fetch: every valid and test shard and the first num_chunks train shards."""
    from huggingface_hub import HfApi
    files = sorted((f for f in HfApi().list_repo_tree(repo, repo_type="dataset", recursive=True)
                    if SHARD.fullmatch(Path(f.path).name)), key=lambda f: f.path)
    if not files:
        raise ValueError(f"the hub dataset {repo} holds no *_train/valid/test_NNNNNN.bin shards")
    is_train = [SHARD.fullmatch(Path(f.path).name)["split"] == "train" for f in files]
    return [f for f, t in zip(files, is_train) if not t] + [f for f, t in zip(files, is_train) if t][:num_chunks]


def fetch(repo: str, file, out: Path) -> dict:
    from huggingface_hub import hf_hub_download
    target = out / local_name(file.path)
    if target.exists():
        try:
            return {"file": target.name, "tokens": shard_tokens(target)}
        except ValueError as e:
            print(f"{e}: fetching it again", file=sys.stderr)
            target.unlink()
    print(f"fetching {file.path} ({file.size / 1e6:,.0f} MB)", file=sys.stderr, flush=True)
    # hf_hub_download resumes a partial download kept under its local_dir
    path = hf_hub_download(repo, file.path, repo_type="dataset", local_dir=out / ".download")
    try:
        tokens = shard_tokens(path)
    except ValueError as e:
        os.remove(path)
        raise ValueError(f"{file.path} as downloaded from {repo}: {e}") from None
    os.replace(path, target)
    return {"file": target.name, "tokens": tokens}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the shards and manifest.json")
    p.add_argument("--num_chunks", type=int, help="fetch only the first K train shards (default: all)")
    p.add_argument("--repo", default=REPO, help="hub dataset repo holding the packed shards")
    p.add_argument("--tokenize", action="store_true",
                   help="tokenize tattabio/OMG_prot50 with data/prepare.py instead (other flags go to prepare.py)")
    args, rest = p.parse_known_args(argv)
    if args.tokenize:
        import prepare
        return prepare.main(["--hf_dataset", "tattabio/OMG_prot50", "--name", "omg_prot50", "--out", str(args.out),
                             *rest])
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.num_chunks is not None and args.num_chunks < 1:
        p.error("--num_chunks must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "valid": [], "test": []}
    for file in remote_shards(args.repo, args.num_chunks):
        shard = fetch(args.repo, file, args.out)
        shard["sha256"] = file.lfs.sha256 if file.lfs else None  # as the hub declares it
        splits[SHARD.fullmatch(shard["file"])["split"]].append(shard)
    shutil.rmtree(args.out / ".download", ignore_errors=True)  # partial downloads kept for resuming; all done now
    manifest = {"source": {"hf_repo": args.repo}, "command": shlex.join(["python"] + sys.argv),
                "splits": {s: {"tokens": sum(f["tokens"] for f in v), "shards": v} for s, v in splits.items()}}
    write_manifest(args.out, manifest)
    print(f"{args.out}: " + ", ".join(f"{s} {len(v['shards'])} shards / {v['tokens']:,} tokens"
                                      for s, v in manifest["splits"].items()))
    return manifest


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"download_omgprot50.py: error: {e}")
