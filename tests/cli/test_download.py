"""``tune download``: here there is no Hub, so this checks the clear offline error."""

from tests.conftest import assert_one_line_error, run_tune


def test_offline_download_is_one_clear_line(tmp_path):
    result = run_tune(
        "download",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "--output-dir",
        str(tmp_path / "qwen"),
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 1
    assert_one_line_error(
        result.stderr,
        "cannot download 'Qwen/Qwen2.5-0.5B-Instruct'",
        "Hugging Face Hub is not reachable",
    )


def test_unreachable_endpoint_is_one_clear_line(tmp_path):
    # A closed port on loopback: the connection is refused at once, as with no network.
    result = run_tune(
        "download",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "--output-dir",
        str(tmp_path / "qwen"),
        env={
            "HF_ENDPOINT": "http://127.0.0.1:9",
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_ETAG_TIMEOUT": "2",
        },
    )
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "Hugging Face Hub is not reachable")


def fake_snapshot_download(calls):
    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return kwargs["local_dir"] or "/cache/models--org--model/snapshots/abc"

    return snapshot_download


def test_arguments_reach_huggingface_hub(tune, monkeypatch, tmp_path):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download(calls))
    code, out, _ = tune("download", "org/model", "--output-dir", str(tmp_path), "--hf-token", "t")
    assert code == 0 and out == f"downloaded org/model to {tmp_path}\n"
    assert calls[-1] == {
        "repo_id": "org/model",
        "local_dir": str(tmp_path),
        "ignore_patterns": ["original/*"],  # Meta's duplicate raw weights, skipped by default
        "revision": None,
        "token": "t",
    }
    tune("download", "org/model", "--ignore-patterns", "*.pth", "*.bin", "--revision", "v1")
    assert calls[-1]["ignore_patterns"] == ["*.pth", "*.bin"]
    assert calls[-1]["local_dir"] is None and calls[-1]["revision"] == "v1"
    tune("download", "org/model", "--ignore-patterns")
    assert calls[-1]["ignore_patterns"] is None  # the option alone: download everything


def test_malformed_repo_id_is_one_line(tune):
    code, _, err = tune("download", "a/b/c")
    assert code == 1
    assert len(err.splitlines()) == 1
    assert err.startswith("error: 'a/b/c' is not a valid Hub repository id (like org/name)")
