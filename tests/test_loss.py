"""The answer loss applies the LM head to the labelled positions only, and computes exactly what
the full-logits loss computed: same value, same gradients, for every family, through PEFT, DDP and
FSDP2 wrappers; the benchmark measures both."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import warnings
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from vregion.models.layer_map import ARCHITECTURES, layer_map
from vregion.models.tiny import FamilyNotInstalledError, tiny_inputs, tiny_lvlm
from vregion.train.loop import answer_nll, train_steps
from vregion.train.selective import make_region_trainable, trainable_groups

ROOT = Path(__file__).resolve().parents[1]
SUPPORTED = [t for t, spec in ARCHITECTURES.items() if spec.refused is None]
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def batch_of(model) -> tuple[dict, torch.Tensor]:
    """Inputs and labels with a masked prompt (the loss reads only the last text tokens)."""
    batch = tiny_inputs(model, text_len=8, with_labels=True)
    labels = batch.pop("labels")
    labels[0, :-2] = -100  # sample 0: two answer tokens; sample 1: the text after the image
    return batch, labels


def loss_and_grads(model, batch, labels, loss: str) -> tuple[float, int, dict]:
    model.zero_grad(set_to_none=True)
    nll, n = answer_nll(model, batch, labels, precision="fp32", device=CPU, loss=loss)
    (nll / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(nll.detach()), n, grads


def assert_same(a: tuple, b: tuple) -> None:
    assert a[1] == b[1] > 0
    assert a[0] == pytest.approx(b[0], rel=1e-5, abs=1e-5)
    assert a[2].keys() == b[2].keys() and a[2]
    for k in a[2]:
        torch.testing.assert_close(a[2][k], b[2][k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_labelled_loss_equals_the_full_logits_loss(model_type):
    try:
        model = tiny_lvlm(model_type, num_layers=2)
    except FamilyNotInstalledError as err:
        pytest.skip(str(err))
    batch, labels = batch_of(model)
    # The LM head sees only the labelled rows: no batch x sequence x vocabulary tensor.
    seen = []
    hook = layer_map(model).lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: modules_to_save on a nested tower, and so on
        peft = make_region_trainable(
            model, [1], lora_r=4, lora_alpha=8, lora_dropout=0.0, train_vision=True
        )
    labelled = loss_and_grads(peft.train(), batch, labels, "labelled")
    n = int((labels[:, 1:] != -100).sum())
    assert seen == [torch.Size([n, model.config.get_text_config().vocab_size])]
    hook.remove()
    assert_same(labelled, loss_and_grads(peft, batch, labels, "full"))


def _ranks_of_one(tmp_path) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )


def test_labelled_loss_through_ddp_and_fsdp2(tmp_path):
    """The wrapper's own forward runs (so DDP syncs and FSDP gathers): same loss, same grads."""
    from torch.nn.parallel import DistributedDataParallel

    from vregion.train.sharding import shard_model

    model = tiny_lvlm("llava", num_layers=2)
    batch, labels = batch_of(model)
    peft = make_region_trainable(model, [1], lora_r=4, lora_alpha=8, lora_dropout=0.0)
    plain = loss_and_grads(peft.train(), batch, labels, "full")
    _ranks_of_one(tmp_path)
    try:
        ddp = DistributedDataParallel(copy.deepcopy(peft), find_unused_parameters=True)
        got = loss_and_grads(ddp, batch, labels, "labelled")
        assert_same((got[0], got[1], {k[len("module.") :]: v for k, v in got[2].items()}), plain)
        sharded = shard_model(copy.deepcopy(peft))
        got = loss_and_grads(sharded, batch, labels, "labelled")
        assert_same((got[0], got[1], {k: v.full_tensor() for k, v in got[2].items()}), plain)
    finally:
        torch.distributed.destroy_process_group()


def test_train_steps_loss_modes_follow_the_same_curve():
    def curve(loss: str) -> list[float]:
        torch.manual_seed(0)
        model = tiny_lvlm("qwen2_vl", num_layers=2)
        batch, labels = batch_of(model)
        model = make_region_trainable(model, [0], lora_r=4, lora_alpha=8, lora_dropout=0.0)
        rows = train_steps(
            model,
            iter([{**batch, "labels": labels}] * 3),
            trainable_groups(model, projector_lr=1e-2, llm_lr=1e-2),
            steps=3,
            warmup_ratio=0.0,
            precision="fp32",
            device=CPU,
            loss=loss,
        )
        return [row["loss"] for row in rows]

    labelled, full = curve("labelled"), curve("full")
    assert labelled == pytest.approx(full, abs=1e-4)
    assert labelled[-1] < labelled[0]
    with pytest.raises(ValueError, match="loss must be one of"):
        curve("everything")


def _benchmark():
    path = ROOT / "benchmarks" / "selective_step_time.py"
    spec = importlib.util.spec_from_file_location("selective_step_time", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def test_benchmark_runs_both_losses(tiny_embedded_dir, tiny_processor, tmp_path):
    from vregion.data import synthetic
    from vregion.data.dataset import index_records

    path, bench = _benchmark()
    proc = subprocess.run(
        [sys.executable, str(path), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0 and "--loss {labelled,full}" in proc.stdout

    synthetic.build_split(tmp_path, "train", 4, seed=0, questions_per_image=2)
    index_records(tmp_path / "train" / "vqa.jsonl", tmp_path, tiny_processor, "Answer briefly.")
    args = Namespace(
        model=str(tiny_embedded_dir[0]),
        data=str(tmp_path),
        one="region_lora",
        warmup=0,
        steps=2,
        batch_size=2,
        lora_r=4,
        precision="fp32",
        system_prompt="Answer briefly.",
    )
    results = {loss: bench.run_one(Namespace(**vars(args), one_loss=loss)) for loss in bench.LOSSES}
    assert {r["loss"] for r in results.values()} == {"labelled", "full"}
    assert all(len(r["seconds"]) == 2 and r["peak_memory_mib"] > 0 for r in results.values())
    assert results["labelled"]["losses"] == pytest.approx(results["full"]["losses"], abs=1e-4)
