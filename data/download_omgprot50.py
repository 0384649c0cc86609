"""The OMGprot50 shards: downloaded packed from the Hugging Face hub, or tokenized here.

    python data/download_omgprot50.py --out data/omg                   # every shard (100M tokens each)
    python data/download_omgprot50.py --out data/omg --num_chunks 4    # valid, test and the first 4 train shards
    python data/download_omgprot50.py --out data/omg --tokenize        # build them from tattabio/OMG_prot50 with
                                                                       # data/prepare.py (its flags may follow)

The hub repo's files `{prefix}_{train|val|valid|test}_NNNNNN.bin` land in --out as `{prefix}_{split}_NNNNNN.bin`
with `val` renamed `valid`, the name the trainer looks for. Each file is downloaded into --out/.download, checked
against the sha256 the hub declares for it and its header read, and only then moved to its final name; manifest.json
comes last, when every shard is there. An interrupted run is resumed by running the command again: shards already
there (their sha256 checked again) are kept, a partial download continues where it stopped. An --out holding shards
this run would not fetch is refused, since the trainer reads every shard of its folder. The hub is the one
HF_ENDPOINT names (default https://huggingface.co); a token from HF_TOKEN or `hf auth login` is sent if there is one.
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import http.client
import json
import os
import re
import shlex
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request

from dataloader import file_sha256, shard_tokens, write_manifest

REPO = "Synthyra/omg_prot50_packed"
SHARD = re.compile(r"(?P<prefix>.+)_(?P<split>train|val|valid|test)_(?P<index>\d{6})\.bin")
CHUNK = 1 << 20


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")  # as huggingface_hub reads it


def local_name(remote: str) -> str:
    m = SHARD.fullmatch(Path(remote).name)
    return f"{m['prefix']}_{'valid' if m['split'] == 'val' else m['split']}_{m['index']}.bin"


def hub_get(url: str, start: int = 0):
    """An open response for a hub URL, from byte `start` on. The token goes to the hub only: the Authorization
    header is not repeated to the storage a download is redirected to, which would refuse it.

    Plain HTTP rather than huggingface_hub's downloader, whose behaviour changes across the versions we accept: its
    progress is a tqdm bar (redrawn with \\r, one endless line in a log), an unreachable hub means half a minute of
    retries, and where it keeps a partial download depends on the version."""
    from huggingface_hub import get_token
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    if token := get_token():
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        return urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        raise ValueError(f"the hub answered {url} with HTTP {e.code} {e.reason}: check --repo, HF_ENDPOINT and, "
                         "for a private repo, your token") from None
    except (OSError, http.client.HTTPException) as e:
        raise ValueError(f"cannot reach the hub at {endpoint()} ({getattr(e, 'reason', e)}): check the "
                         "network or HF_ENDPOINT") from None


def remote_shards(repo: str, num_chunks: int | None) -> list:
    """The hub's shard files to fetch, as {path, size, sha256}: every valid and test shard and the first num_chunks
    train shards."""
    url, entries = f"{endpoint()}/api/datasets/{repo}/tree/main?recursive=true", []
    while url:  # the listing comes in pages, each naming the next in its Link header
        with hub_get(url) as r:
            entries += json.load(r)
            next_page = re.search(r'<([^>]+)>;\s*rel="next"', r.headers.get("Link", ""))
        url = next_page and next_page[1]
    files = []
    for e in sorted(entries, key=lambda e: e["path"]):
        if e["type"] == "file" and SHARD.fullmatch(Path(e["path"]).name):
            if not e.get("lfs"):
                raise ValueError(f"the hub declares no sha256 for {e['path']} (not an LFS file): cannot verify it")
            files.append({"path": e["path"], "size": e["size"], "sha256": e["lfs"]["oid"]})
    if not files:
        raise ValueError(f"the hub dataset {repo} holds no *_train/valid/test_NNNNNN.bin shards")
    is_train = [SHARD.fullmatch(Path(f["path"]).name)["split"] == "train" for f in files]
    return [f for f, t in zip(files, is_train) if not t] + [f for f, t in zip(files, is_train) if t][:num_chunks]


def size(n: float) -> str:
    for unit in ("B", "kB", "MB"):
        if n < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} GB"


def rate_line(label: str, done: int, total: int, fetched: int, since: float) -> str:
    """'label: done of total, rate, time left', the rate from the bytes fetched since `since`."""
    rate = fetched / max(time.time() - since, 1e-6)
    left = (total - done) / rate if rate else float("inf")
    left = f"{left:.0f} s" if left < 100 else f"{left / 60:.0f} min" if left < 6000 else f"{left / 3600:.1f} h"
    return f"{label}: {size(done)} of {size(total)}, {size(rate)}/s, {left} left"


class Progress:
    """The bytes this run has fetched, of all it has to fetch."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()

    def line(self) -> str:
        return rate_line("all", self.done, self.total, self.done, self.start)


def fetch(repo: str, file: dict, part: Path, progress: Progress) -> None:
    """Download a hub file into `part`, continuing the partial download an earlier run left there. Progress lines
    go to stderr every few seconds: plain lines, readable in a log or under tee."""
    have = part.stat().st_size if part.exists() else 0
    if have >= file["size"]:  # complete but not yet checked when the earlier run stopped
        return
    print(f"fetching {file['path']} ({size(file['size'])}" + (f", {size(have)} of it already here)" if have else ")"),
          file=sys.stderr, flush=True)
    url = f"{endpoint()}/datasets/{repo}/resolve/main/{urllib.parse.quote(file['path'])}"
    start, got = time.time(), 0
    last = start
    with hub_get(url, have) as r, open(part, "ab") as f:
        if r.status != 206:  # the whole file came, not the rest of it
            f.truncate(0)
            have = 0
        try:
            while chunk := r.read(CHUNK):
                f.write(chunk)
                got += len(chunk)
                progress.done += len(chunk)
                if time.time() - last > 5:
                    last = time.time()
                    print(f"  {rate_line(file['path'], have + got, file['size'], got, start)}; {progress.line()}",
                          file=sys.stderr, flush=True)
        except (OSError, http.client.HTTPException) as e:
            raise ValueError(f"{file['path']}: the download stopped after {size(have + got)} of "
                             f"{size(file['size'])} ({e}); run the command again to resume it") from None
    if have + got < file["size"]:
        raise ValueError(f"{file['path']}: the hub closed the connection after {size(have + got)} of "
                         f"{size(file['size'])}; run the command again to resume it")
    print(f"  {rate_line(file['path'], have + got, file['size'], got, start)}; {progress.line()}",
          file=sys.stderr, flush=True)


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
    start = time.time()
    files = remote_shards(args.repo, args.num_chunks)
    extra = sorted({f.name for f in args.out.glob("*.bin")} - {local_name(f["path"]) for f in files})
    if extra:  # the trainer reads every shard of the folder, so each must be in the manifest
        raise ValueError(f"{args.out} holds shards this run would not fetch ({', '.join(extra)}): move them away, "
                         "or fetch them too with a larger --num_chunks")
    downloads = args.out / ".download"  # partial downloads, kept for resuming
    downloads.mkdir(parents=True, exist_ok=True)
    if any((args.out / local_name(f["path"])).exists() for f in files):
        print(f"checking the sha256 of the shards already in {args.out}", file=sys.stderr, flush=True)
    todo, verified = [], {}  # verified: local name -> sha256
    for file in files:
        target = args.out / local_name(file["path"])
        if target.exists():
            if target.stat().st_size == file["size"] and file_sha256(target) == file["sha256"]:
                verified[target.name] = file["sha256"]
                continue
            print(f"{target} differs from the hub's {file['path']}: fetching it again", file=sys.stderr)
            target.unlink()
        todo.append(file)
    parts = [downloads / f"{local_name(f['path'])}.part" for f in todo]
    progress = Progress(sum(f["size"] - min(p.stat().st_size if p.exists() else 0, f["size"])
                            for f, p in zip(todo, parts)))
    for file, part in zip(todo, parts):
        fetch(args.repo, file, part, progress)
        got = file_sha256(part)
        if got != file["sha256"]:
            part.unlink()
            raise ValueError(f"{file['path']} as downloaded from {args.repo} has sha256 {got}, not the "
                             f"{file['sha256']} the hub declares: deleted it; run the command again to fetch it anew")
        try:
            shard_tokens(part)
        except ValueError as e:
            part.unlink()
            raise ValueError(f"{file['path']} as downloaded from {args.repo}: {e}") from None
        name = local_name(file["path"])
        part.replace(args.out / name)
        verified[name] = got
    shutil.rmtree(downloads)
    splits = {"train": [], "valid": [], "test": []}
    for name, sha in verified.items():
        splits[SHARD.fullmatch(name)["split"]].append({"file": name, "tokens": shard_tokens(args.out / name),
                                                       "sha256": sha})
    manifest = {"source": {"hf_repo": args.repo}, "command": shlex.join(["python"] + sys.argv),
                "splits": {s: {"tokens": sum(f["tokens"] for f in v), "shards": sorted(v, key=lambda f: f["file"])}
                           for s, v in splits.items()}}
    write_manifest(args.out, manifest)
    print(f"{args.out}: " + ", ".join(f"{s} {len(v['shards'])} shards / {v['tokens']:,} tokens"
                                      for s, v in manifest["splits"].items())
          + f"; {size(progress.done)} fetched, {time.time() - start:.1f} s in all")
    return manifest


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"download_omgprot50.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("download_omgprot50.py: interrupted; run the command again to resume")
