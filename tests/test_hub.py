"""No surprise downloads: model.sd_path is fetched from the Hub only with model.allow_download=True."""

import json

import huggingface_hub
import pytest

from mtok_jax import config_utils
from mtok_jax.models import diffusion, hub


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Record snapshot_download calls; a call 'downloads' a snapshot with unet/config.json into tmp_path.
    The HF cache points at an empty tmp folder, so nothing real is cached."""
    made = []

    def fake_snapshot_download(repo_id, **kwargs):
        made.append((repo_id, kwargs))
        root = tmp_path / "snapshot"
        (root / "unet").mkdir(parents=True, exist_ok=True)
        (root / "unet" / "config.json").write_text("{}")
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return made


def test_default_config_never_downloads():
    assert config_utils.load_config("configs/default.py").model.allow_download is False


@pytest.mark.parametrize("path", ["/no/such/stable-diffusion-v1-4", "./sd-v1-4", "models/sd/v1-4", "../sd"])
def test_local_looking_path_that_does_not_exist(calls, path):
    for allow in (False, True):
        with pytest.raises(FileNotFoundError, match=f"^not found: {path} "):
            hub.resolve_folder(path, "unet", allow_download=allow)
    with pytest.raises(FileNotFoundError, match=f"^not found: {path} "):
        diffusion.load_unet(path)
    assert calls == []


def test_hub_id_without_opt_in_is_not_fetched(calls):
    for load in (diffusion.load_unet, diffusion.load_vae, diffusion.read_scheduler_config):
        with pytest.raises(FileNotFoundError) as e:
            load("CompVis/stable-diffusion-v1-4")
        assert str(e.value).startswith("not found: CompVis/stable-diffusion-v1-4 (")
        assert "set model.allow_download=True to fetch hub id CompVis/stable-diffusion-v1-4" in str(e.value)
    assert calls == []


def test_hub_id_with_opt_in_is_fetched(calls, tmp_path):
    folder = hub.resolve_folder("org/name", "unet", allow_download=True)
    assert folder == str(tmp_path / "snapshot" / "unet")
    assert [repo for repo, _ in calls] == ["org/name"]
    assert calls[0][1]["allow_patterns"] == ["unet/*.json", "unet/*.txt", "unet/*.safetensors", "unet/*.msgpack"]
    assert not calls[0][1].get("local_files_only", False)


def test_hub_id_in_the_local_cache_is_used_without_opt_in(calls, tmp_path):
    """A cached snapshot (HF cache layout: refs/main → snapshots/<sha>/...) resolves with no call."""
    repo = tmp_path / "hf_cache" / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123" / "scheduler").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"beta_schedule": "scaled_linear"}))
    assert diffusion.read_scheduler_config("org/name") == {"beta_schedule": "scaled_linear"}
    with pytest.raises(FileNotFoundError, match="no unet/config.json of hub id org/name"):
        hub.resolve_folder("org/name", "unet")  # cached repo, but not this part
    assert calls == []


def test_existing_folder_without_the_part(calls, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        hub.resolve_folder(tmp_path, "unet", allow_download=True)
    assert calls == []
