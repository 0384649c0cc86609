"""data/download_omgprot50.py against a loopback HTTP server that answers the hub's tree and resolve URLs for a
local folder (HF_ENDPOINT points the script at it), and --tokenize against a local dataset folder."""
import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))
import download_omgprot50  # noqa: E402
from dataloader import CLS, EOS, read_shard, write_shard  # noqa: E402

HUB_REPO = "Synthyra/omg_prot50_packed"


class Hub(http.server.BaseHTTPRequestHandler):
    """The hub's tree listing (in pages of 3 entries, as the hub pages long listings) and file downloads, with Range
    requests. Files named in `cut` are sent only up to that many bytes before the connection closes; files named in
    `corrupt` are sent with one byte changed, unlike the sha256 the listing declares."""
    folder: Path
    fetched: list  # (file name, first byte asked for) of every download
    cut: dict
    corrupt: set

    def log_message(self, *args):
        pass

    def do_GET(self):
        tree = f"/api/datasets/{HUB_REPO}/tree/main"
        url = urllib.parse.urlsplit(self.path)
        if url.path == tree:
            start = int(urllib.parse.parse_qs(url.query).get("cursor", ["0"])[0])
            files = sorted(self.folder.iterdir())
            body = json.dumps([{"type": "file", "path": p.name, "size": p.stat().st_size, "oid": "0" * 40,
                                "lfs": {"size": p.stat().st_size, "pointerSize": 134,
                                        "oid": hashlib.sha256(p.read_bytes()).hexdigest()}}
                               for p in files[start:start + 3]])
            more = {"Link": f'<http://{self.headers["Host"]}{tree}?recursive=true&cursor={start + 3}>; rel="next"'}
            return self.reply(200, body.encode(), more if start + 3 < len(files) else {})
        prefix = f"/datasets/{HUB_REPO}/resolve/main/"
        path = self.folder / self.path[len(prefix):]
        if not self.path.startswith(prefix) or not path.is_file():
            return self.reply(404, b"", {"X-Error-Code": "EntryNotFound"})
        data = bytearray(path.read_bytes())
        if path.name in self.corrupt:
            data[-1] ^= 1
        start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0])
        self.fetched.append((path.name, start))
        self.reply(206 if start else 200, data[start:], {}, self.cut.get(path.name))

    def reply(self, code, body, headers, cut=None):
        self.send_response(code)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[:cut])


def shard(*docs):
    return np.array([t for d in docs for t in (CLS, *d, EOS)], dtype=np.uint8)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    folder = tmp_path / "hub"
    folder.mkdir()
    # the public repo's layout: val/test shard 0, train shards from 1
    write_shard(folder / "omgprot50_val_000000.bin", shard([5, 6], [7]))
    write_shard(folder / "omgprot50_test_000000.bin", shard([8, 9, 10]))
    for i in (1, 2, 3):
        write_shard(folder / f"omgprot50_train_{i:06d}.bin", shard([4] * i, [5, 6]))
    (folder / "README.md").write_text("not a shard")
    handler = type("Handler", (Hub,), {"folder": folder, "fetched": [], "cut": {}, "corrupt": set()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # quick to shut down
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield handler
    server.shutdown()


def download(*args):
    return download_omgprot50.main(list(map(str, args)))


def same_as_hub(out, hub):
    for p in out.glob("*.bin"):
        assert p.read_bytes() == (hub.folder / p.name.replace("_valid_", "_val_")).read_bytes()


def test_download_verifies_and_records_sha256s(hub, tmp_path, capsys):
    out = tmp_path / "out"
    download("--out", out, "--num_chunks", 2)
    assert sorted(p.name for p in out.iterdir()) == [  # the shards and the manifest, no partial download
        "manifest.json", "omgprot50_test_000000.bin", "omgprot50_train_000001.bin", "omgprot50_train_000002.bin",
        "omgprot50_valid_000000.bin"]
    same_as_hub(out, hub)
    assert all(read_shard(p)[0] == CLS for p in out.glob("*.bin"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] == 7 + 8
    assert {f["file"]: f["sha256"] for s in manifest["splits"].values() for f in s["shards"]} == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.bin")}
    # progress lines, per file and in all: bytes, rate and time left
    assert re.search(r"omgprot50_train_000002\.bin: 1\.0 kB of 1\.0 kB, [\d.]+ [kMG]?B/s, 0 s left; "
                     r"all: 4\.1 kB of 4\.1 kB, [\d.]+ [kMG]?B/s, 0 s left", capsys.readouterr().err)
    # fewer train shards than the folder holds: refused, the folder left as it was
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"omgprot50_train_000002\.bin.*--num_chunks"):
        download("--out", out, "--num_chunks", 1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_interrupted_download_resumes(hub, tmp_path):
    out = tmp_path / "out"
    half = (hub.folder / "omgprot50_train_000002.bin").stat().st_size // 2
    hub.cut["omgprot50_train_000002.bin"] = half  # the connection drops half way through
    with pytest.raises(ValueError, match=r"omgprot50_train_000002\.bin: .*run the command again to resume"):
        download("--out", out, "--num_chunks", 2)
    assert sorted(p.name for p in out.glob("*.bin")) == [
        "omgprot50_test_000000.bin", "omgprot50_train_000001.bin", "omgprot50_valid_000000.bin"]
    assert not (out / "manifest.json").exists()
    # the rerun fetches the rest of that file, and a local shard that differs from the hub's again, nothing else
    hub.cut.clear()
    hub.fetched.clear()
    damaged = out / "omgprot50_train_000001.bin"
    damaged.write_bytes(damaged.read_bytes()[:-2])
    manifest = download("--out", out, "--num_chunks", 3)
    assert sorted(hub.fetched) == [("omgprot50_train_000001.bin", 0), ("omgprot50_train_000002.bin", half),
                                   ("omgprot50_train_000003.bin", 0)]
    same_as_hub(out, hub)
    assert len(manifest["splits"]["train"]["shards"]) == 3


def test_bad_downloads_are_refused(hub, tmp_path):
    out = tmp_path / "out"
    hub.corrupt.add("omgprot50_train_000001.bin")  # not the bytes whose sha256 the hub declares
    with pytest.raises(ValueError, match=r"omgprot50_train_000001\.bin .* sha256 .* run the command again"):
        download("--out", out, "--num_chunks", 1)
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
        "omgprot50_test_000000.bin", "omgprot50_valid_000000.bin"]  # nothing half made, nothing kept of it
    # a file the hub holds as it declares, but not a shard
    hub.corrupt.clear()
    (hub.folder / "omgprot50_train_000000.bin").write_bytes(b"\0" * 2000)
    with pytest.raises(ValueError, match=r"omgprot50_train_000000\.bin .*is not a token shard"):
        download("--out", out, "--num_chunks", 1)
    assert not (out / "omgprot50_train_000000.bin").exists() and not (out / "manifest.json").exists()


def test_unreachable_hub_is_one_clear_message(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, str(REPO / "data" / "download_omgprot50.py"), "--out", str(tmp_path / "out")],
                       env={**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}"}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr  # one line, no traceback
    assert r.stderr.startswith("download_omgprot50.py: error: cannot reach the hub at http://127.0.0.1:")
    assert "check the network or HF_ENDPOINT" in r.stderr and not (tmp_path / "out").exists()


def test_tokenize_builds_shards_with_prepare(tmp_path):
    data = tmp_path / "omg"
    data.mkdir()
    seqs = ["MKVL", "ACDE", "WWYY", "GHIK", "LMNP", "QRST"] * 5
    (data / "train.jsonl").write_text("".join(json.dumps({"id": str(i), "sequence": s}) + "\n"
                                              for i, s in enumerate(seqs)))
    out = tmp_path / "out"
    manifest = download("--tokenize", "--out", out, "--hf_dataset", data, "--num_valid", 3, "--num_test", 3,
                        "--workers", 1)
    assert [manifest["splits"][s]["sequences"] for s in ("train", "valid", "test")] == [24, 3, 3]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert read_shard(out / "omg_prot50_train_000000.bin").sum() > 0


def test_run_sh_downloads_the_track_then_launches_its_record(hub, small_shards, tmp_path):
    """`TRACK=omgprot50 bash run.sh`, the real script, against the loopback hub serving real shards (prepare.py's
    of the sample, in the hub's names): it downloads them into DATA, then launches train.py with the track's
    record flags and the batch split for NGPU=1. CUDA is hidden from it, so train.py then refuses the record's
    65,536-token micro-batch with its one-line CPU-memory message: that refusal, made by train.py from the flags
    it parsed, is what shows the launch. A second run finds the data and downloads nothing."""
    from data.tracks import TRACKS
    from dataloader import verified_fingerprint
    from model import PRESETS, cpu_attention_bytes
    track = TRACKS["omgprot50"]
    if cpu_attention_bytes(PRESETS["speedrun"], 65536) <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2:
        pytest.skip("this host's memory would let train.py train the record on the CPU instead of refusing it")
    for p in hub.folder.iterdir():
        p.unlink()
    for split, remote in [("train", "train_000001"), ("valid", "val_000000"), ("test", "test_000000")]:
        (hub.folder / f"omgprot50_{remote}.bin").write_bytes((small_shards / f"small_{split}_000000.bin").read_bytes())
    data = tmp_path / "omgprot50"
    env = {**os.environ, "TRACK": "omgprot50", "DATA": str(data), "NGPU": "1", "PYTHON": sys.executable,
           "CUDA_VISIBLE_DEVICES": "", "PIP_NO_INDEX": "1"}  # the CPU even on a GPU host; pip never goes online

    def run_sh(ngpu):
        return subprocess.run(["bash", str(REPO / "run.sh")], env={**env, "NGPU": ngpu}, capture_output=True,
                              text=True, timeout=120)

    r = run_sh("1")
    out = r.stdout + r.stderr
    assert "run.sh: track omgprot50's data are missing" in r.stdout, out
    assert "fetching omgprot50_train_000001.bin" in r.stderr and " left; all: " in r.stderr  # progress
    assert sorted(hub.fetched) == [(p.name, 0) for p in sorted(hub.folder.iterdir())]
    assert sorted(p.name for p in data.iterdir()) == [  # no partial download left
        "manifest.json", "omgprot50_test_000000.bin", "omgprot50_train_000001.bin", "omgprot50_valid_000000.bin"]
    same_as_hub(data, hub)
    verified_fingerprint(data)  # train.py's check of a data folder passes
    # the launch: the record's flags, its 524,288-token batch as 1 GPU x 8 micro-batches x 65,536 tokens
    assert track.global_batch == 1 * 8 * 65536
    assert (f"run.sh: track omgprot50's record on 1 GPU(s): {sys.executable} -m torch.distributed.run --standalone "
            f"--nproc_per_node=1 train.py --data {data} {track.record} --tokens_per_rank 65536 --grad_accum 8\n"
            ) in r.stdout, out
    assert r.returncode == 1, out
    assert re.search(r"^train\.py: error: --tokens_per_rank 65536 needs about \d+ GiB on the CPU.* speedrun's heads",
                     r.stderr, re.M), out
    assert "run.sh: rank 0 stopped first, exit code 1" in r.stderr, out
    assert "Traceback" not in out and "ChildFailedError" not in out  # one line each: no traceback of train.py's or
    # of the launcher's
    # again: 3 GPUs cannot split the batch, refused before the data are looked at or anything is launched
    hub.fetched.clear()
    r = run_sh("3")
    assert r.returncode == 1 and hub.fetched == [] and "missing" not in r.stdout, r.stdout + r.stderr
    assert r.stderr == "run.sh: 3 GPUs cannot share the record's 524288-token batch evenly; set NGPU to 1, 2, 4 or 8\n"
