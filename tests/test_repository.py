"""`python -m export repository`: what it writes from the miniature, what it reuses, what it refuses. The published
layout end to end is tests/test_published_checkpoint.py."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import MINIATURE
from export.__main__ import main
from export.repository import RepositoryError, build_repository, read_parameters, reusable_artifact


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    out = tmp_path_factory.mktemp("repository")
    assert main(["repository", "--checkpoint", str(MINIATURE), "--out", str(out), "--max-batch", "4"]) == 0
    return out


def test_the_repository_is_complete(repository):
    model = repository / "dlm"
    parameters = read_parameters((model / "config.pbtxt").read_text())
    config = json.loads((MINIATURE / "config.json").read_text())
    assert parameters["block_length"] == str(config["block_size"]) and parameters["max_live"] == "4"
    assert parameters["context"] == "1024"  # the artifact's limit
    assert (model / "1" / "model.py").is_file() and (model / "1" / "dlm" / "deployment.py").is_file()
    assert {p.name for p in (model / "1" / "tokenizer").iterdir()} >= {"config.json", "generation_config.json",
                                                                         "tokenizer.json", "tokenizer_config.json"}
    assert (model / "1" / "engine" / "model.onnx").is_file()


def test_a_second_run_reuses_the_artifact_and_other_limits_rebuild_it(repository):
    lines: list[str] = []
    build_repository(MINIATURE, repository, max_batch=4, log=lines.append)
    assert any(line.startswith("reusing the artifact") for line in lines)
    engine = repository / "dlm" / "1" / "engine"
    assert reusable_artifact(engine, MINIATURE, "fp32", 4, None, "auto")
    assert not reusable_artifact(engine, MINIATURE, "fp32", 8, None, "auto")  # other batch
    assert not reusable_artifact(engine, MINIATURE, "bf16", 4, None, "auto")  # other precision
    assert not reusable_artifact(engine, MINIATURE, "fp32", 4, None, None)  # without the draft adapter
    assert not reusable_artifact(engine, MINIATURE, "fp32", 4, 512, "auto")  # other context


def test_a_checkpoint_without_tokenizer_is_refused(tmp_path, repository):
    checkpoint = shutil.copytree(MINIATURE, tmp_path / "checkpoint")
    (checkpoint / "tokenizer.json").unlink()
    out = tmp_path / "out"
    shutil.copytree(repository / "dlm" / "1" / "engine", out / "dlm" / "1" / "engine")  # reused: no export
    with pytest.raises(RepositoryError, match="has no tokenizer.json"):
        build_repository(checkpoint, out, max_batch=4, log=lambda line: None)


def test_a_repository_that_cannot_load_is_refused(tmp_path, repository):
    """The load check is the server's: a tokenizer that contradicts config.json fails the command, not Triton."""
    checkpoint = shutil.copytree(MINIATURE, tmp_path / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "bos_token_id": 3}))
    with pytest.raises(RepositoryError, match="does not load: .*bos_token_id 3"):
        build_repository(checkpoint, tmp_path / "out", max_batch=4, log=lambda line: None)
