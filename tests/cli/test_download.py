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
