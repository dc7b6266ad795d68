"""The tiny checkpoint's cache: many processes asking at once build it once."""

import threading
import time

import attune.demo.tiny as tiny


def test_concurrent_first_use_builds_the_checkpoint_once(tmp_path, monkeypatch):
    builds = []

    def slow_build(folder):
        builds.append(folder)
        time.sleep(0.3)  # long enough for every other caller to arrive while it builds
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(tiny, "_write_checkpoint", slow_build)
    # flock locks belong to open file descriptions, so threads contend like torchrun ranks
    found = []
    callers = [
        threading.Thread(target=lambda: found.append(tiny.tiny_checkpoint(tmp_path)))
        for _ in range(4)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(builds) == 1
    assert found == [tmp_path / f"tiny-v{tiny.VERSION}"] * 4
