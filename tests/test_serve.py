"""Issue 14, parts 1 and 4: the detection service (serve.py on LitServe).

One server runs for the module (``serve.py`` as a process, on a free loopback port, with an
API key, small limits and two inference workers on the CPU) and is stopped at the end: its
process group must be gone and its upload folder empty. Against it:

- every file's JSON equals infer.py's row for the same file (label, probability, threshold,
  the fallback for undecodable files), with requests sent concurrently;
- malformed requests (no key, wrong key, wrong content type, empty, too large, too many files,
  broken multipart) and hostile files, sent concurrently, get their status or their per-file
  error while the good files of the same request are scored; the server stays healthy;
- ``?heatmap=1`` adds a PNG of the forgery map.

In-process, one batch of several requests (what LitServe's dynamic batching hands a worker)
through a checkpoint with a face stage and an attribution head: each request gets its own
entries, with ``n_faces``, ``type`` and ``type_prob`` equal to infer.py's.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import csv
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import badimages as bad
from conftest import ROOT, SUBPROCESS_ENV, compose
from unmask.service.api import DetectionAPI, records_of
from unmask.service.uploads import stored_name
from unmask.tasks.infer import run_inference

requests = pytest.importorskip("requests")

KEY = "test-key-0123"
AUTH = {"X-API-Key": KEY}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Good images, the undecodable and odd files of tests/badimages.py, and a short video."""
    from test_video import counter_frames, write_video

    root = tmp_path_factory.mktemp("serve") / "testset"
    root.mkdir()
    for i in range(8):
        (bad.good_jpeg if i % 2 else bad.good_png)(root / f"good_{i}.{'jpg' if i % 2 else 'png'}", seed=i)
    for name, make in bad.BAD_FILES.items():
        make(root / name)
    write_video(root / "clip.mp4", counter_frames(6))
    (root / "broken.mp4").write_bytes(b"\x00" * 256)
    return {"root": root, "names": sorted(p.name for p in root.iterdir())}


@pytest.fixture(scope="module")
def infer_rows(tiny_ckpt, files, tmp_path_factory) -> dict:
    """infer.py's label and probability of every file."""
    out = tmp_path_factory.mktemp("infer_out")
    result = run_inference(compose("infer", [f"ckpt={tiny_ckpt}", f"input={files['root']}", f"output_dir={out}", "scores=true",
                                             "scoring.num_workers=0", "scoring.batch_size=8", "scoring.progress=false"]))
    labels = {row[0]: int(row[1]) for row in csv.reader(open(result, newline=""))}
    with open(result.with_suffix(".scores.csv"), newline="") as f:
        scores = {row["name"]: row for row in csv.DictReader(f)}
    return {n: {"label": labels[n], "prob": float(scores[n]["prob"]) if scores[n]["prob"] else None, "ok": scores[n]["ok"] == "True"}
            for n in labels}


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    uploads = tmp_path_factory.mktemp("uploads")
    port = free_port()
    env = {**SUBPROCESS_ENV, "UNMASK_API_KEY": KEY}
    log = open(uploads.parent / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "serve.py"), f"ckpt={tiny_ckpt}", f"port={port}", "workers_per_device=2", "max_batch_size=8", "batch_timeout=0.05",
         "max_request_mb=1", "max_files=6", f"upload_dir={uploads}", "threads=1", "scoring.batch_size=8"],
        cwd=uploads, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, (uploads.parent / "serve.log").read_text(errors="replace")[-3000:]
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.25)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("serve.py did not become healthy")
    yield {"url": url, "proc": proc, "uploads": uploads, "log": uploads.parent / "serve.log"}
    proc.send_signal(signal.SIGTERM)  # stops as Ctrl+C does: workers, HTTP servers, the upload folder
    try:
        proc.wait(timeout=90)
        deadline = time.monotonic() + 30
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left_running = _group_alive(proc.pid)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert not left_running, "serve.py left processes running after SIGTERM"
    assert list(uploads.iterdir()) == [], "serve.py left its upload folder behind"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def post(url: str, paths: list[Path], headers=AUTH, **kwargs):
    parts = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    return requests.post(f"{url}/predict", files=parts, headers=headers, timeout=120, **kwargs)


@pytest.mark.slow
def test_health_answers_without_the_key_once_the_model_is_loaded(server):
    response = requests.get(f"{server['url']}/health", timeout=10)
    assert response.status_code == 200 and response.text == "ok"
    if Path("/proc").is_dir():  # workers_per_device=2: two inference workers (spawned) in the server's group
        assert len(_spawned_in_group(server["proc"].pid)) == 2


def _spawned_in_group(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_every_files_json_equals_infer_py_with_concurrent_requests(server, files, infer_rows):
    root = files["root"]
    names = files["names"]
    groups = [names[i : i + 5] for i in range(0, len(names), 5)]  # several requests at once, several files each
    with cf.ThreadPoolExecutor(len(groups)) as pool:
        responses = list(pool.map(lambda g: post(server["url"], [root / n for n in g]), groups))
    seen = {}
    for group, response in zip(groups, responses):
        assert response.status_code == 200, response.text
        body = response.json()
        assert [e["name"] for e in body["files"]] == group  # one entry per file, in the order sent
        seen.update({e["name"]: e for e in body["files"]})
    assert set(seen) == set(infer_rows)
    for name, want in infer_rows.items():
        got = seen[name]
        assert got["label"] == want["label"], name
        assert got["ok"] == want["ok"], name
        if want["ok"]:
            assert got["prob"] == pytest.approx(want["prob"], abs=2e-6), name
            assert got["error"] == ""
        else:
            assert got["prob"] is None and got["error"], name
            assert str(server["uploads"]) not in got["error"] and "/req-" not in got["error"]  # no server path leaks
        assert got["n_faces"] is None and got["type"] is None  # no face stage, no attribution head
    assert seen["clip.mp4"]["n_frames"] > 0 and seen["clip.mp4"]["video_seconds"] > 0
    assert {e["threshold"] for e in seen.values()} == {responses[0].json()["threshold"]}


@pytest.mark.slow
def test_bad_requests_and_hostile_files_sent_together_leave_the_server_healthy(server, files):
    url, root = server["url"], files["root"]
    good = root / "good_1.jpg"
    hostile = [root / n for n in ("bomb.png", "random_bytes.jpg", "empty.jpg", "truncated.jpg", "broken.mp4")]
    big = io.BytesIO(os.urandom((1 << 20) + 10))

    def chunked():
        yield b"x" * (600 << 10)
        yield b"x" * (600 << 10)

    calls = {
        "no key": lambda: post(url, [good], headers={}),
        "wrong key": lambda: post(url, [good], headers={"X-API-Key": "nope"}),
        "bearer": lambda: post(url, [good], headers={"Authorization": f"Bearer {KEY}"}),
        "json": lambda: requests.post(f"{url}/predict", json={"files": [{"path": "/etc/passwd"}]}, headers=AUTH, timeout=60),
        "no type": lambda: requests.post(f"{url}/predict", data=b"abc", headers={**AUTH, "Content-Type": ""}, timeout=60),
        "empty multipart": lambda: requests.post(f"{url}/predict", files=[("other", ("x.txt", b"x"))], headers=AUTH, timeout=60),
        "empty raw": lambda: requests.post(f"{url}/predict", data=b"", headers={**AUTH, "Content-Type": "image/jpeg"}, timeout=60),
        "too large": lambda: requests.post(f"{url}/predict", files=[("files", ("big.jpg", big))], headers=AUTH, timeout=60),
        "too large chunked": lambda: requests.post(f"{url}/predict", data=chunked(), headers={**AUTH, "Content-Type": "image/jpeg"}, timeout=60),
        "too many files": lambda: post(url, [good] * 7),
        "broken multipart": lambda: requests.post(
            f"{url}/predict", data=b"--b\r\nContent-Disposition: form-data; name=files; filename=a.jpg\r\n\r\nabc",
            headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"}, timeout=60),
        "hostile files": lambda: post(url, [good, *hostile]),
        "raw traversal name": lambda: requests.post(
            f"{url}/predict", data=good.read_bytes(), headers={**AUTH, "Content-Type": "image/jpeg", "X-Filename": "../../etc/passwd"}, timeout=60),
        "get": lambda: requests.get(f"{url}/predict", headers=AUTH, timeout=60),
    }
    with cf.ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(call) for name, call in calls.items()}
        got = {name: f.result() for name, f in futures.items()}
    expected = {
        "no key": 401, "wrong key": 401, "bearer": 200, "json": 415, "no type": 415, "empty multipart": 400, "empty raw": 400,
        "too large": 413, "too large chunked": 413, "too many files": 413, "broken multipart": 400, "hostile files": 200,
        "raw traversal name": 200, "get": 405,
    }
    assert {name: r.status_code for name, r in got.items()} == expected, {n: r.text[:200] for n, r in got.items()}

    entries = got["hostile files"].json()["files"]
    assert [e["name"] for e in entries] == [good.name] + [p.name for p in hostile]
    assert entries[0]["ok"] and entries[0]["prob"] is not None  # the good file keeps its answer
    by_name = {e["name"]: e for e in entries}
    for name in ("bomb.png", "random_bytes.jpg", "empty.jpg", "broken.mp4"):
        assert not by_name[name]["ok"] and by_name[name]["error"] and by_name[name]["label"] == 0, by_name[name]
    assert by_name["truncated.jpg"]["ok"]  # decoded as far as it goes, as infer.py does
    assert got["raw traversal name"].json()["files"][0]["name"] == "../../etc/passwd"  # echoed, never used as a path

    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    again = post(url, [good])
    assert again.status_code == 200 and again.json()["files"][0]["prob"] == entries[0]["prob"]
    assert server["proc"].poll() is None
    time.sleep(0.5)
    assert [p for p in server["uploads"].rglob("*") if p.is_file()] == []  # every upload removed after its answer


@pytest.mark.slow
def test_heatmap_is_a_png_of_the_forgery_map_when_asked(server, files):
    from PIL import Image

    response = post(server["url"], [files["root"] / "good_2.png", files["root"] / "clip.mp4"], params={"heatmap": "1"})
    assert response.status_code == 200, response.text
    image, video = response.json()["files"]
    heat = Image.open(io.BytesIO(base64.b64decode(image["heatmap"])))
    assert heat.format == "PNG" and heat.mode == "L" and heat.size[0] > 1
    assert "heatmap" not in video  # maps are for image files
    plain = post(server["url"], [files["root"] / "good_2.png"]).json()["files"][0]
    assert "heatmap" not in plain and plain["prob"] == pytest.approx(image["prob"], abs=1e-6)


def test_upload_names_are_made_by_the_server():
    assert stored_name(3, "../../etc/passwd") == "0003"
    assert stored_name(0, "photo.JPG") == "0000.jpg"
    assert stored_name(12, "clip.mp4") == "0012.mp4"
    assert stored_name(1, "a.j p g") == "0001"
    assert stored_name(2, "x.verylongsuffix") == "0002"
    assert stored_name(5, "C:\\Users\\x\\evil.png") == "0005.png"


def test_a_workers_rows_are_pandas_records_value_for_value():
    import numpy as np
    import pandas as pd

    table = pd.DataFrame({
        "path": ["a.jpg", "b.mp4"], "prob": np.array([0.25, np.nan], np.float32), "label": np.array([1, -1]), "ok": [True, False],
        "n_faces": [2.0, np.nan], "type": ["gan", ""], "error": ["", "could not be decoded"],
    })
    fast, slow = records_of(table), table.to_dict("records")
    assert len(fast) == 2 and [list(r) for r in fast] == [list(r) for r in slow]
    for a, b in zip(fast, slow):
        for key in a:
            assert type(a[key]) is type(b[key]), key  # Python values, as to_dict gives (json-safe)
            assert a[key] == b[key] or (a[key] != a[key] and b[key] != b[key]), key
    assert records_of(table.iloc[:0]) == []


def test_a_payload_that_did_not_come_through_the_gate_is_refused(tmp_path):
    from unmask.core.schemas import ScoringConfig

    api = DetectionAPI("x.ckpt", ScoringConfig(), None, token="secret", upload_root=str(tmp_path))
    assert "refused" in api.decode_request({"token": "guess", "files": [{"name": "a", "path": str(tmp_path / "a.jpg")}]})
    assert "refused" in api.decode_request({"token": "secret", "files": [{"name": "a", "path": "/etc/passwd"}]})
    assert "refused" in api.decode_request({"token": "secret", "files": [{"name": "a", "path": str(tmp_path / ".." / "x")}]})
    ok = api.decode_request({"token": "secret", "files": [{"name": "a", "path": str(tmp_path / "req-1" / "0000.jpg")}], "heatmap": 1})
    assert ok["heatmap"] is True and ok["files"][0]["name"] == "a"


def test_one_batch_of_several_requests_answers_each_with_faces_and_type_as_infer_py(tmp_path):
    """What a worker gets from LitServe's dynamic batching: several requests' jobs (one of
    them refused) in one ``predict``; a checkpoint with a face stage and an attribution head."""
    import shutil

    import pandas as pd
    import torch

    from conftest import TINY_TRAIN_OVERRIDES
    from data.io import atomic_path
    from unmask.core.checkpoint import FORMAT
    from unmask.core.schemas import options
    from unmask.tasks.train import build_module

    cfg = compose("train", TINY_TRAIN_OVERRIDES + ["attribution=coarse", "faces=template", "faces.crop=true", "faces.whole_image=true",
                                                   f"hydra.run.dir={tmp_path}", f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"])
    module = build_module(cfg)  # untrained: the plumbing, not the accuracy
    ckpt = tmp_path / "faces_type.ckpt"
    with atomic_path(ckpt) as tmp:
        torch.save({"state_dict": module.state_dict(),
                    "unmask": {"format": FORMAT, "run_config": module.run_config, "threshold": 0.5, "threshold_from": "test"}}, tmp)
    root = tmp_path / "in"
    root.mkdir()
    for i in range(4):
        (bad.good_jpeg if i % 2 else bad.good_png)(root / f"good_{i}.{'jpg' if i % 2 else 'png'}", seed=i)
    bad.BAD_FILES["random_bytes.jpg"](root / "random_bytes.jpg")
    result = run_inference(compose("infer", [f"ckpt={ckpt}", f"input={root}", f"output_dir={tmp_path / 'out'}", "scores=true",
                                             "scoring.num_workers=0", "scoring.batch_size=8", "scoring.progress=false"]))
    want = pd.read_csv(result.with_suffix(".scores.csv")).set_index("name")
    labels = {row.split(",")[0]: int(row.split(",")[1]) for row in result.read_text().splitlines()}

    uploads = tmp_path / "uploads"
    shutil.copytree(root, uploads / "req-1")
    api = DetectionAPI(str(ckpt), options(compose("serve", [f"ckpt={ckpt}"]).scoring), None, token="tok", upload_root=str(uploads))
    api.setup("cpu")
    names = sorted(p.name for p in root.iterdir())

    def job(group: list[str]) -> dict:
        return {"token": "tok", "files": [{"name": n, "path": str(uploads / "req-1" / n)} for n in group]}

    answers = api.predict([api.decode_request(job(names[:2])), api.decode_request({"token": "guess"}), api.decode_request(job(names[2:]))])

    assert len(answers) == 3 and answers[1] == {"error": "this payload did not come through the upload gate", "files": []}
    assert [e["name"] for e in answers[0]["files"]] == names[:2] and [e["name"] for e in answers[2]["files"]] == names[2:]
    for entry in answers[0]["files"] + answers[2]["files"]:
        row = want.loc[entry["name"]]
        assert entry["label"] == labels[entry["name"]] and entry["ok"] == bool(row["ok"]), entry
        if not entry["ok"]:  # random_bytes.jpg: its own error entry, the batch went on
            assert entry["prob"] is None and entry["type"] is None and "random_bytes.jpg" in entry["error"]
            continue
        assert entry["prob"] == pytest.approx(row["prob"], abs=2e-6)
        assert entry["n_faces"] == row["n_faces"] == 1  # the template face stage found its one face
        assert entry["type"] == row["type"] and entry["type"] in api.scorer.loaded.detector.class_names
        assert entry["type_prob"] == pytest.approx(row["type_prob"], abs=2e-6)


def test_a_share_threshold_is_refused_by_the_service(tiny_ckpt, tmp_path):
    from unmask.tasks.serve import build_server

    cfg = compose("serve", [f"ckpt={tiny_ckpt}", "scoring.threshold=prior:0.5", f"upload_dir={tmp_path}"])
    with pytest.raises(ValueError, match="prior"):
        build_server(cfg)
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


@pytest.mark.gpu
@pytest.mark.slow
def test_the_service_on_cuda_answers_as_on_the_cpu(tiny_ckpt, files, infer_rows, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), f"ckpt={tiny_ckpt}", f"port={port}", "scoring.accelerator=gpu"],
                            cwd=tmp_path, env=SUBPROCESS_ENV, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(480):
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.25)
        names = [n for n in files["names"] if infer_rows[n]["ok"]][:5]
        entries = requests.post(f"{url}/predict", files=[("files", (n, (files["root"] / n).read_bytes())) for n in names], timeout=120).json()["files"]
        for e in entries:
            assert abs(e["prob"] - infer_rows[e["name"]]["prob"]) < 5e-3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
