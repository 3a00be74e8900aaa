import json
import shutil

import pytest
import torch

from services.models import ModelConfigError, load_model
from services.tools.tiny import make_tiny_model


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    # Several shards plus model.safetensors.index.json, as real checkpoints come.
    return make_tiny_model(
        tmp_path_factory.mktemp("sharded") / "m", "qwen3_moe", seed=1, max_shard_size="200KB"
    )


def test_sharded_checkpoint_with_index_loads_like_single_file(sharded_dir, model_dirs):
    shards = sorted(p.name for p in sharded_dir.glob("*.safetensors"))
    assert len(shards) > 1 and (sharded_dir / "model.safetensors.index.json").is_file()
    sharded, _ = load_model(sharded_dir)
    single, _ = load_model(model_dirs["qwen3_moe"])
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_shards_without_index_load(tmp_path, sharded_dir):
    d = tmp_path / "noindex"
    shutil.copytree(sharded_dir, d)
    (d / "model.safetensors.index.json").unlink()
    _, cfg = load_model(d)
    assert cfg.family == "qwen3_moe"


def test_missing_shard_is_named(tmp_path, sharded_dir):
    d = tmp_path / "missing"
    shutil.copytree(sharded_dir, d)
    victim = sorted(d.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelConfigError, match=f"lists shard\\(s\\) missing from .*: {victim.name}"):
        load_model(d)


def test_missing_tensors_are_named(tmp_path, sharded_dir):
    d = tmp_path / "partial"
    shutil.copytree(sharded_dir, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(d.glob("*.safetensors"))[-1]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != victim.name}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    victim.unlink()
    with pytest.raises(ModelConfigError, match="is missing tensors: "):
        load_model(d)


def test_no_weights_at_all(tmp_path, ds_dir):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(ds_dir / "config.json", d)
    with pytest.raises(ModelConfigError, match=r"has no \*\.safetensors weights"):
        load_model(d)
