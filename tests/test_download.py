"""data/download_omgprot50.py against a loopback HTTP server that answers the hub's tree and resolve URLs for a
local folder (HF_ENDPOINT points huggingface_hub at it), and --tokenize against a local dataset folder."""
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from dataloader import CLS, EOS, read_shard, write_shard  # noqa: E402

HUB_REPO = "Synthyra/omg_prot50_packed"


class Hub(http.server.BaseHTTPRequestHandler):
    folder: Path
    fetched: list

    def log_message(self, *args):
        pass

    def do_GET(self):
        tree = f"/api/datasets/{HUB_REPO}/tree/main"
        if self.path.split("?")[0] == tree:
            files = sorted(p for p in self.folder.iterdir())
            body = json.dumps([{"type": "file", "path": p.name, "size": p.stat().st_size, "oid": "0" * 40,
                                "lfs": {"size": p.stat().st_size, "pointerSize": 134,
                                        "oid": hashlib.sha256(p.read_bytes()).hexdigest()}} for p in files])
            return self.reply(200, body.encode(), {"Content-Type": "application/json"})
        self.serve_file(send_body=True)

    def do_HEAD(self):
        self.serve_file(send_body=False)

    def serve_file(self, send_body):
        prefix = f"/datasets/{HUB_REPO}/resolve/main/"
        path = self.folder / self.path[len(prefix):]
        if not self.path.startswith(prefix) or not path.is_file():
            return self.reply(404, b"", {"X-Error-Code": "EntryNotFound"})
        data = path.read_bytes()
        start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0])
        if send_body:
            self.fetched.append(path.name)
        headers = {"X-Repo-Commit": "1" * 40, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        self.reply(206 if start else 200, data[start:], headers, send_body)

    def reply(self, code, body, headers, send_body=True):
        self.send_response(code)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        if send_body:
            self.wfile.write(body)


def shard(*docs):
    return np.array([t for d in docs for t in (CLS, *d, EOS)], dtype=np.uint8)


@pytest.fixture
def hub(tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    # the public repo's layout: val/test shard 0, train shards from 1
    write_shard(folder / "omgprot50_val_000000.bin", shard([5, 6], [7]))
    write_shard(folder / "omgprot50_test_000000.bin", shard([8, 9, 10]))
    for i in (1, 2, 3):
        write_shard(folder / f"omgprot50_train_{i:06d}.bin", shard([4] * i, [5, 6]))
    (folder / "README.md").write_text("not a shard")
    handler = type("Handler", (Hub,), {"folder": folder, "fetched": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, handler.fetched, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def download(endpoint, tmp_path, *args):
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, str(REPO / "data" / "download_omgprot50.py"), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=60)


def test_partial_download_resumes_and_checks_headers(hub, tmp_path):
    folder, fetched, endpoint = hub
    out = tmp_path / "out"
    r = download(endpoint, tmp_path, "--out", out, "--num_chunks", 2)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.glob("*.bin")) == [
        "omgprot50_test_000000.bin", "omgprot50_train_000001.bin", "omgprot50_train_000002.bin",
        "omgprot50_valid_000000.bin"]
    for p in out.glob("*.bin"):  # unchanged bytes, readable by our reader
        remote = p.name.replace("_valid_", "_val_")
        assert p.read_bytes() == (folder / remote).read_bytes() and read_shard(p)[0] == CLS
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] == 7 + 8
    assert manifest["splits"]["valid"]["shards"][0]["sha256"] == hashlib.sha256(
        (folder / "omgprot50_val_000000.bin").read_bytes()).hexdigest()
    # again with one more chunk and a damaged local shard: only those two are fetched
    fetched.clear()
    (out / "omgprot50_train_000001.bin").write_bytes((out / "omgprot50_train_000001.bin").read_bytes()[:-2])
    r = download(endpoint, tmp_path, "--out", out, "--num_chunks", 3)
    assert r.returncode == 0, r.stderr
    assert "truncated" in r.stderr and sorted(fetched) == ["omgprot50_train_000001.bin", "omgprot50_train_000003.bin"]
    # a corrupt shard on the hub is an error naming it, and never appears under its final name
    (folder / "omgprot50_train_000004.bin").write_bytes(b"\0" * 2000)
    r = download(endpoint, tmp_path, "--out", out)
    assert r.returncode != 0 and "omgprot50_train_000004.bin is not a token shard" in r.stderr
    assert not (out / "omgprot50_train_000004.bin").exists()


def test_tokenize_builds_shards_with_prepare(tmp_path):
    data = tmp_path / "omg"
    data.mkdir()
    seqs = ["MKVL", "ACDE", "WWYY", "GHIK", "LMNP", "QRST"] * 5
    (data / "train.jsonl").write_text("".join(json.dumps({"id": str(i), "sequence": s}) + "\n"
                                              for i, s in enumerate(seqs)))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "data" / "download_omgprot50.py"), "--tokenize", "--out", str(out),
                        "--hf_dataset", str(data), "--num_valid", "3", "--num_test", "3", "--workers", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [manifest["splits"][s]["sequences"] for s in ("train", "valid", "test")] == [24, 3, 3]
    assert read_shard(out / "omg_prot50_train_000000.bin").sum() > 0
