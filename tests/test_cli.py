"""The `vregion` command line, run through `main()` and once as the installed console script."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vregion.cli import main
from vregion.models.tiny import tiny_lvlm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_says_what_vregion_does(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "visual region" in out and "25%" in out and "pruned" in out
    assert "layers" in out


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        (
            "llava",
            ["model.language_model.layers.3", "model.vision_tower", "model.multi_modal_projector"],
        ),
        ("qwen2_5_vl", ["model.language_model.layers.0", "model.visual", "model.visual.merger"]),
    ],
)
def test_layers_of_a_tiny_model(capsys, arch, expected):
    assert main(["layers", f"tiny:{arch}"]) == 0
    out = capsys.readouterr().out
    for path in expected:
        assert path in out
    assert "4 LLM layers" in out and "total" in out


def test_layers_of_a_checkpoint_directory(capsys, tmp_path):
    model = tiny_lvlm("qwen2_vl", num_layers=3)
    model.save_pretrained(tmp_path)
    assert main(["layers", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Qwen2VLForConditionalGeneration" in out and "3 LLM layers" in out
    assert f"{sum(p.numel() for p in model.parameters()):,}" in out


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("tiny:gpt2", "unknown tiny architecture 'gpt2'"),
        ("/nonexistent/checkpoint", "no checkpoint directory /nonexistent/checkpoint"),
    ],
)
def test_layers_reports_bad_models_in_one_line(capsys, model, message):
    assert main(["layers", model]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vregion: error: ") and message in err
    assert "Traceback" not in err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "vregion"
    script = str(script) if script.exists() else shutil.which("vregion")
    assert script, "the vregion console script is not installed: pip install -e ."
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "visual region" in result.stdout and "layers" in result.stdout


@pytest.mark.slow
def test_layers_of_the_embedded_default(capsys):
    assert main(["layers", "embedded"]) == 0
    out = capsys.readouterr().out
    assert "30 LLM layers" in out and "model.language_model.layers.29" in out


def _dvc_repo(path):
    import os

    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=path, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=path, check=True, env=env)
    return path


def test_remote_points_dvc_at_the_s3_store_with_secrets_only_local(tmp_path, s3_env, capsys):
    repo = _dvc_repo(tmp_path)
    assert main(["remote", "--repo", str(repo)]) == 0
    assert s3_env.url("dvc") in capsys.readouterr().out
    committed = (repo / ".dvc" / "config").read_text()
    assert s3_env.endpoint_url in committed and "storage" in committed
    assert s3_env.secret_access_key not in committed
    assert s3_env.secret_access_key in (repo / ".dvc" / "config.local").read_text()


def test_remote_with_wrong_credentials_fails_clearly_and_writes_nothing(
    tmp_path, s3_env, monkeypatch, capsys
):
    repo = _dvc_repo(tmp_path)
    before = (repo / ".dvc" / "config").read_text()
    monkeypatch.setenv("VREGION_S3_SECRET_ACCESS_KEY", "not-the-secret-0000")
    assert main(["remote", "--repo", str(repo)]) == 1
    err = capsys.readouterr().err
    assert s3_env.endpoint_url in err and "not-the-secret" not in err
    assert (repo / ".dvc" / "config").read_text() == before
    assert not (repo / ".dvc" / "config.local").exists()


def test_params_lists_documented_fields_and_checks_a_file(tmp_path, capsys):
    from vregion.cli import main

    assert main(["params", "finetune"]) == 0
    out = capsys.readouterr().out
    assert "finetune.data: list[DataMix] = ['synthetic/train/vqa']" in out
    assert "finetune.loader.group_by_length: bool = False" in out
    assert "Literal['lora', 'full']" in out and "\ndata.sources" not in out  # one section
    bad = tmp_path / "params.yaml"
    bad.write_text("finetune:\n  data: [nope]\n")
    assert main(["params", "--check", str(bad)]) == 1
    assert "unknown source 'nope'" in capsys.readouterr().err
