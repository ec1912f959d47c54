"""L2SPCallback: measured in real Trainer runs (distance to w0 with and without the penalty, head pulled to 0, the
penalty logged), exact at the unit level (the gradient added is alpha * (w - w0)), and resumable (w0 stays the
pretrained weights, read back from the checkpoint)."""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import torch
from tiny_models import RandomTokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from tl_plugin import freeze, unfreeze  # noqa: E402
from tl_plugin.callbacks.base import attach  # noqa: E402
from tl_plugin.callbacks.regularization import L2SP_REFERENCE_FILE, L2SPCallback  # noqa: E402

HEAD = ("classifier.weight", "classifier.bias")


# Tiny models: one intra-op thread is faster, and far faster on a busy 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(
        BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99
        )
    )


def training_args(tmp_path, **overrides) -> TrainingArguments:
    values: dict[str, Any] = dict(
        output_dir=str(tmp_path / "out"), max_steps=20, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=5, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return TrainingArguments(**values)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def distance(model: torch.nn.Module, w0: dict[str, torch.Tensor], names) -> float:
    params = dict(model.named_parameters())
    return math.sqrt(sum(float((params[n].detach() - w0[n]).square().sum()) for n in names))


def train(
    tmp_path, callback: L2SPCallback | None, **overrides
) -> tuple[Trainer, BertForSequenceClassification, dict[str, torch.Tensor]]:
    model = tiny_bert()
    freeze(model, "embeddings")
    w0 = snapshot(model)
    trainer = Trainer(model=model, args=training_args(tmp_path, **overrides), train_dataset=RandomTokens())
    if callback is not None:
        attach(trainer, callback)
    trainer.train()
    return trainer, model, w0


def test_large_alpha_keeps_the_trainable_weights_near_w0_and_the_penalty_is_logged(tmp_path):
    _, plain, w0 = train(tmp_path / "plain", None, gradient_accumulation_steps=2)
    callback = L2SPCallback(alpha=10.0)
    regularised, regularised_model, w0_again = train(
        tmp_path / "l2sp", callback, gradient_accumulation_steps=2
    )
    assert all(torch.equal(w0[n], w0_again[n]) for n in w0)
    names = [n for n, p in plain.named_parameters() if p.requires_grad and n not in HEAD]
    far, near = distance(plain, w0, names), distance(regularised_model, w0, names)
    # measured (AdamW, lr 1e-2, 20 steps): 3.38 without, 0.082 with alpha=10
    assert far > 1.0
    assert near < 0.1 * far, (near, far)
    for model in (plain, regularised_model):  # frozen parameters untouched, no gradient created for them
        for name, param in model.named_parameters():
            if name.startswith("bert.embeddings."):
                assert torch.equal(param, w0[name]), name
                assert param.grad is None, name
    assert set(callback.pretrained_parameter_names).isdisjoint(HEAD)
    assert callback.head_parameter_names == list(HEAD)
    logged = [e for e in regularised.state.log_history if "tl/l2sp_penalty" in e]
    assert [e["step"] for e in logged] == [5, 10, 15, 20]  # once per logging step, with accumulation
    # logging through Trainer.log from on_step_end must not swallow the Trainer's own loss log of that step
    assert [e["step"] for e in regularised.state.log_history if "loss" in e] == [5, 10, 15, 20]
    assert all(math.isfinite(e["tl/l2sp_penalty"]) and e["tl/l2sp_penalty"] > 0 for e in logged)
    assert all(e["tl/l2sp_distance"] > 0 for e in logged)
    # the logged penalty is consistent with the logged distance: alpha/2 * mean(d^2) >= alpha/2 * mean(d)^2
    assert all(e["tl/l2sp_penalty"] >= 5.0 * e["tl/l2sp_distance"] ** 2 * 0.999 for e in logged)


def test_beta_pulls_the_head_toward_zero(tmp_path):
    _, plain, w0 = train(tmp_path / "plain", None)
    _, pulled, _ = train(tmp_path / "beta", L2SPCallback(alpha=0.0, beta=10.0))
    norm = {
        key: math.sqrt(sum(float(dict(model.named_parameters())[n].detach().square().sum()) for n in HEAD))
        for key, model in (("plain", plain), ("beta", pulled))
    }
    start = math.sqrt(sum(float(w0[n].square().sum()) for n in HEAD))
    # measured: start 0.166, plain 0.311, beta=10 0.027
    assert norm["beta"] < 0.5 * start, (norm, start)
    assert norm["beta"] < 0.25 * norm["plain"], (norm, start)


def _begin(callback: L2SPCallback, model, tmp_path, step: int = 0) -> TrainerState:
    state = TrainerState(global_step=step)
    callback.on_train_begin(training_args(tmp_path), state, TrainerControl(), model=model)
    return state


def test_the_gradient_added_is_exactly_alpha_times_w_minus_w0(tmp_path):
    model = tiny_bert()
    freeze(model, ["embeddings", "blocks.0"])
    callback = L2SPCallback(alpha=0.5, beta=0.25)  # powers of two: the products are exact
    state = _begin(callback, model, tmp_path)
    w0 = snapshot(model)
    unfreeze(model, "blocks.0")  # unfrozen after train start: pulled toward its train-start value
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
                if name != "bert.pooler.dense.bias":  # one trainable parameter without a gradient
                    param.grad = torch.randn(param.shape, generator=generator)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    after_perturbation = snapshot(model)
    callback.on_pre_optimizer_step(training_args(tmp_path), state, TrainerControl(), model=model)

    for name, param in model.named_parameters():
        assert torch.equal(param, after_perturbation[name]), name  # the callback changes gradients only
        if not param.requires_grad:
            assert name.startswith("bert.embeddings."), name
            assert param.grad is None, name
            continue
        term = 0.25 * param.detach() if name in HEAD else 0.5 * (param.detach() - w0[name])
        before = grads[name]
        expected = term if before is None else before + term
        assert param.grad is not None, name
        assert torch.equal(param.grad, expected), name
    assert model.get_parameter("bert.encoder.layer.0.attention.self.query.weight").grad is not None
    penalty = 0.25 * sum(float((p.detach() - w0[n]).square().sum()) for n, p in model.named_parameters()
                         if p.requires_grad and n not in HEAD)  # fmt: skip
    penalty += 0.125 * sum(float(model.get_parameter(n).detach().square().sum()) for n in HEAD)
    assert callback._penalty_sum is not None
    assert float(callback._penalty_sum) == pytest.approx(penalty, rel=1e-5)


def test_resume_keeps_the_pretrained_reference(tmp_path):
    args: dict[str, Any] = dict(
        max_steps=4, save_strategy="steps", save_steps=2, output_dir=str(tmp_path / "run")
    )
    _, _, pretrained = train(tmp_path, L2SPCallback(alpha=1.0), **args)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    saved = load_file(str(checkpoint / L2SP_REFERENCE_FILE))
    assert set(saved) == {n for n in pretrained if n not in HEAD}
    assert all(torch.equal(saved[n], pretrained[n]) for n in saved)
    assert (tmp_path / "run" / "checkpoint-2" / L2SP_REFERENCE_FILE).is_file()

    model = tiny_bert(seed=1)  # another init: the checkpoint's weights replace it
    freeze(model, "embeddings")
    callback = L2SPCallback(alpha=1.0)
    trainer = attach(
        Trainer(
            model=model,
            args=training_args(tmp_path, **{**args, "max_steps": 6}),
            train_dataset=RandomTokens(),
        ),
        callback,
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 6
    reference = callback.reference_weights
    assert all(torch.equal(reference[n], pretrained[n]) for n in saved)
    trained = load_file(str(checkpoint / "model.safetensors"))
    assert not torch.equal(trained["bert.pooler.dense.weight"], pretrained["bert.pooler.dense.weight"])

    (checkpoint / L2SP_REFERENCE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="reference"):
        _begin(L2SPCallback(alpha=1.0), tiny_bert(), tmp_path / "run", step=4)


def test_an_explicit_reference_is_checked():
    model = tiny_bert()
    reference = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    callback = L2SPCallback(alpha=2.0, reference=reference)
    callback.setup(model)
    expected = sum(float(p.detach().square().sum()) for n, p in model.named_parameters() if n not in HEAD)
    assert float(callback.penalty()) == pytest.approx(expected, rel=1e-5)
    del reference["bert.pooler.dense.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 pretrained parameter.*bert\.pooler\.dense\.weight"):
        callback.setup(model)
    reference["bert.pooler.dense.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"has shape \(3,\), the parameter has \(32, 32\)"):
        callback.setup(model)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": -1.0}, r"`alpha` must be a finite number >= 0, got -1.0"),
        ({"beta": float("nan")}, r"`beta` must be a finite number >= 0, got nan"),
        ({"alpha": "0.1"}, r"`alpha` must be a finite number >= 0, got '0.1'"),
        ({"alpha": True}, r"`alpha` must be a finite number >= 0, got True"),
        ({"head": [""]}, r"`head` must be None"),
        ({"reference": 3}, r"`reference` must be a path"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        L2SPCallback(**kwargs)


def test_head_selectors_and_no_head():
    model = tiny_bert()
    callback = L2SPCallback(head=["bert.pooler.*", "head"])
    callback.setup(model)
    assert callback.head_parameter_names == ["bert.pooler.dense.weight", "bert.pooler.dense.bias", *HEAD]
    callback = L2SPCallback(head=[])
    callback.setup(model)
    assert callback.head_parameter_names == []
    with pytest.raises(ValueError, match="matches no parameter"):
        L2SPCallback(head="re:nothing").setup(model)
    with pytest.raises(RuntimeError, match="setup"):
        L2SPCallback().penalty()


DDP_WORKER = r"""
import json, os, sys
import torch, torch.distributed as dist
torch.set_num_threads(1)
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
from tl_plugin import freeze
from tl_plugin.callbacks.base import attach
from tl_plugin.callbacks.regularization import L2SPCallback
from tl_plugin.losses import WeightedCrossEntropyLoss

from tl_plugin.testing import RandomTokens

torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
))
freeze(model, "embeddings")
w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
args = TrainingArguments(
    output_dir=sys.argv[1], max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
    learning_rate=1e-2, report_to=[], save_strategy="steps", save_steps=3, use_cpu=True, disable_tqdm=True,
    logging_steps=3, ddp_backend="gloo", seed=0,
)
callback = L2SPCallback(alpha=1.0, beta=0.1)
trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(n=64),
                  compute_loss_func=WeightedCrossEntropyLoss([1.0, 3.0]))
attach(trainer, callback)
trainer.train()
flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
result = json.dumps({
    "rank": dist.get_rank(),
    "same_params": all(torch.equal(gathered[0], g) for g in gathered),
    "moved": not torch.equal(model.bert.pooler.dense.weight, w0["bert.pooler.dense.weight"]),
    "w0_kept": all(torch.equal(t, w0[n]) for n, t in callback.reference_weights.items()),
    "penalty_steps": [e["step"] for e in trainer.state.log_history if "tl/l2sp_penalty" in e],
    "loss_steps": [e["step"] for e in trainer.state.log_history if "loss" in e],
})
with open(os.path.join(sys.argv[2], f"result-{dist.get_rank()}.json"), "w") as f:
    f.write(result)
"""


@pytest.mark.distributed
def test_ddp_two_processes_stay_in_sync(tmp_path):
    """2 gloo processes, gradient accumulation, the weighted loss: replicas identical, logging on rank 0 only."""
    import json
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(script), str(tmp_path / "run"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {
        r["rank"]: r
        for r in (json.loads(path.read_text()) for path in sorted(tmp_path.glob("result-*.json")))
    }
    assert set(results) == {0, 1}, done.stdout[-2000:]
    for rank, result in results.items():
        assert result["same_params"], rank
        assert result["moved"], rank
        assert result["w0_kept"], rank
    assert results[0]["penalty_steps"] == [3, 6]
    assert results[0]["loss_steps"] == [3, 6]
    assert results[1]["penalty_steps"] == []  # main process only
    assert (tmp_path / "run" / "checkpoint-6" / L2SP_REFERENCE_FILE).is_file()
